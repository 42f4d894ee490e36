"""The fused ops as custom operators: torch.library.opcheck on every calibrl:: operator and backend, and
torch.compile(fullgraph=True) of every public op (forward and backward) equal to eager, with no graph break.

Compiled tests use the aot_eager backend (Dynamo + AOTAutograd with fake tensors, then eager kernels: what
decides whether an op composes with torch.compile) except the inductor step tests at the end. Triton runs
under its interpreter on CPU tensors here.
"""

import pytest
import torch
import torch._dynamo
from _cpu_helpers import make_batch, make_linear_case

import calibrl_kernels as ck
from calibrl_kernels import _dispatch, library
from calibrl_kernels.config import CalibRLConfig
from calibrl_kernels.reference import coefficients as coef

CONFIG = CalibRLConfig(entropy_coef=0.01)  # guide, dual clip and entropy terms all present
GROUPS, ROWS_PER_GROUP, T, D, V = 2, 2, 5, 8, 37  # V not a multiple of any block


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces anew: the backend is chosen while tracing (CALIBRL_IMPL is read then)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _logits_case(dtype=torch.float32, seed=0):
    case = make_linear_case(CONFIG, groups=GROUPS, rows_per_group=ROWS_PER_GROUP, T=T, D=D, V=V, seed=seed)
    logits = (case.hidden.detach() @ case.weight.detach().t()).to(dtype)
    return case, _leaf(logits)


def _on(device: torch.device, value):
    """value with its tensors moved to device (leaves that required grad stay leaves that require grad)."""
    if not isinstance(value, torch.Tensor):
        return value
    moved = value.detach().to(device)
    return moved.requires_grad_(True) if value.requires_grad else moved


# --------------------------------------------------------------------------------------------
# opcheck on every registered operator, per backend
# --------------------------------------------------------------------------------------------
def _operator_calls(impl: str, dtype: torch.dtype, device: torch.device = torch.device("cpu")):
    """(operator, args) of every calibrl:: operator backend ``impl`` implements, on small inputs on device."""
    case, logits = _logits_case(dtype)
    case = case._replace(
        hidden=_on(device, case.hidden),
        weight=_on(device, case.weight),
        bias=_on(device, case.bias),
        targets=case.targets.to(device),
        batch=case.batch._replace(**{name: _on(device, t) for name, t in case.batch._asdict().items()}),
    )
    logits = _on(device, logits)
    targets, inputs = case.targets, case.batch.inputs()
    table = coef.loss_token_table(targets, inputs, CONFIG, torch.float32 if dtype != torch.float64 else dtype)
    ops = torch.ops.calibrl
    calls = []
    N = targets.numel()
    grad_tokens = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3)).to(device)
    if impl in ("cpp", "triton"):
        _, _, rows = ops.token_logprobs(logits.detach(), targets, 0.7, -100, impl)
        calls.append((ops.token_logprobs.default, (logits, targets, 0.7, -100, impl)))
        calls.append(
            (
                ops.token_logprobs_backward.default,
                (logits.detach(), targets, rows, grad_tokens, -grad_tokens, 0.7, -100, impl),
            )
        )
        loss_args = (logits, targets, table, CONFIG.key, -100)
        _, _, loss_rows = ops.fused_calibrl_loss(logits.detach(), *loss_args[1:], False, impl)
        calls.append((ops.fused_calibrl_loss.default, loss_args + (False, impl)))
        backward_args = (targets, loss_rows, torch.tensor(0.5, device=device), CONFIG.key, -100, impl)
        calls.append((ops.fused_calibrl_loss_backward.default, (logits.detach(),) + backward_args))
        calls.append((ops.fused_calibrl_loss_backward_.default, (logits.detach().clone(),) + backward_args))
    hidden, weight, bias = (t.detach().to(dtype) for t in (case.hidden, case.weight, case.bias))
    leaves = tuple(_leaf(t) for t in (hidden, weight, bias))
    needs = [True, True, True]
    _, _, rows = ops.linear_token_logprobs(hidden, weight, bias, targets, 0.7, -100, 0, impl)
    calls.append((ops.linear_token_logprobs.default, leaves + (targets, 0.7, -100, 0, impl)))
    calls.append(
        (
            ops.linear_token_logprobs_backward.default,
            (hidden, weight, bias, targets, rows, grad_tokens, -grad_tokens, 0.7, -100, needs, 0, impl),
        )
    )
    linear_args = (targets, table, CONFIG.key, -100, needs, 0, impl)
    calls.append((ops.fused_linear_calibrl_loss.default, leaves + linear_args))
    if not library.forms_gradients_in_forward(impl):
        _, _, linear_rows, *_ = ops.fused_linear_calibrl_loss(hidden, weight, bias, *linear_args)
        calls.append(
            (
                ops.fused_linear_calibrl_loss_backward.default,
                (
                    hidden,
                    weight,
                    bias,
                    targets,
                    linear_rows,
                    torch.tensor(0.5, device=device),
                    CONFIG.key,
                    -100,
                    needs,
                    impl,
                ),
            )
        )
    if impl == "triton":
        scores = torch.tensor([1.0, 0.0, 1.0, 0.2, 1.0, 0.0], dtype=dtype, device=device)
        group_ids = torch.tensor([7, 7, 7, 3, 3, 3], device=device)
        is_expert = torch.tensor([False, False, True, False, False, True], device=device)
        for num_groups in (2, -1):
            group_args = (scores, group_ids, is_expert, True, 1e-6, 0.1, num_groups, impl)
            calls.append((ops.group_advantages.default, group_args))
    assert N > 1
    return calls


IMPLS = ("torch", "cpp", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_every_operator(impl, dtype):
    ok, reason = _dispatch.availability(impl, torch.device("cpu"))
    assert ok, reason
    for op, args in _operator_calls(impl, dtype):
        torch.library.opcheck(op, args)


def test_every_registered_operator_is_opchecked():
    """The union over backends of the operators opchecked above is every operator the library registers."""
    covered = set()
    for impl in IMPLS:
        covered |= {op._schema.name for op, _ in _operator_calls(impl, torch.float32)}
    assert covered == set(library.registered_ops())


def test_configuration_crosses_the_schema_as_its_key():
    config = CalibRLConfig(mode="luffy", dual_clip_c=None, loss_scale_factor=7, entropy_coef=-0.5)
    assert CalibRLConfig.from_key(config.key) == config
    assert isinstance(config.key, str) and config.key != CalibRLConfig().key


def test_dispatch_choice_is_a_graph_constant():
    """_dispatch marks its choice as torch.compiler.assume_constant_result does (without importing dynamo)."""

    def probe():
        return 0

    torch.compiler.assume_constant_result(probe)
    marked = [name for name in vars(probe) if name.startswith("_dynamo")]
    assert marked and all(getattr(_dispatch._choose_while_compiling, name) is True for name in marked)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of every public op, forward and backward, equal to eager
# --------------------------------------------------------------------------------------------
def _run(fn, leaves, compiled: bool, backend="aot_eager"):
    """(outputs, gradients of leaves) of fn(*leaves), eager or compiled with fullgraph=True."""
    leaves = [_leaf(t) for t in leaves]
    call = torch.compile(fn, fullgraph=True, backend=backend) if compiled else fn
    outputs = call(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    differentiable = [o.float().sum() for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(sum(differentiable), leaves, allow_unused=True) if differentiable else ()
    return [o.detach() for o in outputs], grads


def _assert_compiled_equals_eager(fn, leaves, backend="aot_eager", rtol=1e-5, atol=1e-6):
    want, want_grads = _run(fn, leaves, compiled=False)
    got, got_grads = _run(fn, leaves, compiled=True, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
    assert len(got_grads) == len(want_grads)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _graph_breaks(fn, *args) -> int:
    return torch._dynamo.explain(fn)(*args).graph_break_count


def _scores_and_groups():
    B = GROUPS * (ROWS_PER_GROUP + 1)
    group_ids = torch.arange(GROUPS).repeat_interleave(ROWS_PER_GROUP + 1) * 5 + 2  # ids 2, 7: not 0..G-1
    scores = torch.tensor([1.0, 0.0, 1.0, 0.3, 0.0, 1.0])[:B]
    return scores, group_ids


def test_token_logprobs_compiles(backend):
    case, logits = _logits_case()

    def fn(x):
        return ck.token_logprobs(x, case.targets, temperature=0.7, return_entropy=True)

    _assert_compiled_equals_eager(fn, [logits])
    assert _graph_breaks(fn, logits) == 0


def test_linear_token_logprobs_compiles(backend):
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)

    def fn(h, w, b):
        return ck.linear_token_logprobs(h, w, case.targets, bias=b, temperature=1.3, return_entropy=True)

    _assert_compiled_equals_eager(fn, [case.hidden, case.weight, case.bias])
    assert _graph_breaks(fn, case.hidden, case.weight, case.bias) == 0


@pytest.mark.parametrize("config", [CONFIG, CalibRLConfig.for_algo("grpo", dual_clip_c=None)], ids=["calibrl", "grpo"])
def test_fused_calibrl_loss_compiles(backend, config):
    case, logits = _logits_case()
    b = case.batch

    def fn(x):
        return tuple(ck.fused_calibrl_loss(x, case.targets, b.old_logp, b.advantages, b.mask, **b.kwargs(config)))

    _assert_compiled_equals_eager(fn, [logits])
    assert _graph_breaks(fn, logits) == 0


def test_fused_linear_calibrl_loss_compiles(backend):
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch

    def fn(h, w, bias):
        args = (h, w, case.targets, b.old_logp, b.advantages, b.mask)
        return tuple(ck.fused_linear_calibrl_loss(*args, bias=bias, **b.kwargs(CONFIG)))

    _assert_compiled_equals_eager(fn, [case.hidden, case.weight, case.bias])
    assert _graph_breaks(fn, case.hidden, case.weight, case.bias) == 0


def test_scores_and_group_ids_path_compiles(backend):
    """Group statistics and the expert baseline inside the compiled loss: no graph break, with num_groups or
    without it (then B group slots while tracing instead of torch.unique), values equal to eager."""
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    scores, group_ids = _scores_and_groups()
    b = case.batch
    fields = dict(scores=scores, group_ids=group_ids, is_expert=b.is_expert, config=CONFIG)

    def with_count(h, w):
        return ck.fused_linear_calibrl_loss(h, w, case.targets, b.old_logp, None, b.mask, num_groups=GROUPS, **fields)

    def without_count(h, w):
        return ck.fused_linear_calibrl_loss(h, w, case.targets, b.old_logp, None, b.mask, **fields)

    for fn in (with_count, without_count):
        torch._dynamo.reset()
        _assert_compiled_equals_eager(lambda h, w: tuple(fn(h, w)), [case.hidden, case.weight])
        assert _graph_breaks(fn, case.hidden, case.weight) == 0
    torch.testing.assert_close(
        with_count(case.hidden, case.weight).loss, without_count(case.hidden, case.weight).loss, rtol=1e-6, atol=0
    )


def test_group_statistics_compile(backend):
    scores, group_ids = _scores_and_groups()
    case = make_linear_case(CONFIG, T=T, D=D, V=V)
    b = case.batch

    def fn(s, old):
        stats = ck.group_advantages(s, group_ids, is_expert=b.is_expert, norm_by_std=True, num_groups=GROUPS)
        baseline = ck.expert_baseline(old, b.mask, group_ids, b.is_expert, num_groups=GROUPS)
        return stats.advantages, stats.mean, stats.std, stats.pass_rate, baseline

    _assert_compiled_equals_eager(fn, [scores, b.old_logp])
    assert _graph_breaks(fn, scores, b.old_logp) == 0


def test_calibrl_loss_compiles():
    config = CalibRLConfig()
    batch = make_batch(GROUPS, ROWS_PER_GROUP, T, config=config, dtype=torch.float32)
    logp = batch.old_logp + 0.1

    def fn(lp):
        fields = dict(expert_logp=batch.expert_logp, passed=batch.passed, is_expert=batch.is_expert)
        return tuple(ck.calibrl_loss(lp, batch.old_logp, batch.advantages, batch.mask, config=config, **fields))

    _assert_compiled_equals_eager(fn, [logp])
    assert _graph_breaks(fn, logp) == 0


def test_modules_compile(backend):
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch
    module = ck.LinearCalibRLLoss(CONFIG, chunk_bytes=4 * V * 4)  # several chunks on the chunked path

    def fn(h, w):
        return module(h, w, case.targets, b.old_logp, b.advantages, b.mask, **b.fields()).loss

    _assert_compiled_equals_eager(fn, [case.hidden, case.weight])


def test_inplace_backward_is_eager_only(backend):
    """Under torch.compile inplace_backward is accepted and has no effect: the logits keep their values."""
    case, logits = _logits_case()
    b = case.batch
    x = _leaf(logits)
    fn = torch.compile(
        lambda x: (
            ck.fused_calibrl_loss(
                x, case.targets, b.old_logp, b.advantages, b.mask, inplace_backward=True, **b.kwargs(CONFIG)
            ).loss
        ),
        fullgraph=True,
        backend="aot_eager",
    )
    fn(x).backward()
    assert torch.equal(x.detach(), logits.detach()) and x.grad.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------------------------
# A small model + loss step compiled by inductor, forward and backward
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_model_and_loss_step_under_inductor(impl, monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", impl)
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
    head = torch.nn.Linear(D, V, bias=False)
    inputs = case.hidden.detach()

    def step(x):
        hidden = body(x)
        out = ck.fused_linear_calibrl_loss(
            hidden, head.weight, case.targets, b.old_logp, b.advantages, b.mask, **b.kwargs(CONFIG)
        )
        return out.loss

    params = list(body.parameters()) + list(head.parameters())
    eager_loss = step(inputs)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss = compiled(inputs)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_torch_export_keeps_the_operator(backend):
    """torch.export of a module calling the lm_head loss: one calibrl:: node, the eager value."""
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch
    head = torch.nn.Linear(D, V, bias=False)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, hidden, old_logp, advantages, mask, targets, expert_logp, passed, is_expert):
            fields = dict(expert_logp=expert_logp, passed=passed, is_expert=is_expert, config=CalibRLConfig())
            args = (hidden, self.head.weight, targets, old_logp, advantages, mask)
            return ck.fused_linear_calibrl_loss(*args, **fields).loss

    args = (case.hidden.detach(), b.old_logp, b.advantages, b.mask, case.targets, b.expert_logp, b.passed, b.is_expert)
    args = tuple(a.float() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        program = torch.export.export(Head(), args)
        nodes = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("calibrl.")]
        assert nodes == ["calibrl.fused_linear_calibrl_loss.default"]
        torch.testing.assert_close(program.module()(*args), Head()(*args), rtol=1e-6, atol=1e-7)


def test_fsdp2_forward_works_and_dtensor_inputs_are_refused(tmp_path):
    """One gloo process: a fully_shard(ed) module calling the op in its forward trains as the plain module;
    a DTensor handed to the operator directly is refused by torch's DTensor dispatch (no sharding rule)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = torch.nn.Linear(D, V, bias=False)
            self.lm.weight.data.copy_(case.weight.detach())

        def forward(self, hidden, weight=None):
            weight = self.lm.weight if weight is None else weight
            args = (hidden, weight, case.targets, b.old_logp, b.advantages, b.mask)
            return ck.fused_linear_calibrl_loss(*args, **b.kwargs(CONFIG)).loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain, sharded = Head(), Head()
        fully_shard(sharded, mesh=mesh)
        plain(case.hidden.detach()).backward()
        sharded(case.hidden.detach()).backward()
        torch.testing.assert_close(sharded.lm.weight.grad.full_tensor(), plain.lm.weight.grad, rtol=1e-6, atol=1e-7)
        weight = distribute_tensor(case.weight.detach(), mesh, [Shard(0)])
        with pytest.raises(RuntimeError, match="DTensor"):
            plain(case.hidden.detach(), weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_triton_operators_compile_natively_on_cuda(monkeypatch):
    """On a CUDA device: opcheck of every Triton operator, and the lm_head and logits losses compiled by
    inductor with fullgraph=True equal to eager (the default backend there is Triton)."""
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    cuda = torch.device("cuda")
    for op, args in _operator_calls("triton", torch.bfloat16, cuda):
        torch.library.opcheck(op, args)
    case = make_linear_case(CONFIG, T=T, D=D, V=V, dtype=torch.float32)
    b = case.batch._replace(**{name: _on(cuda, t) for name, t in case.batch._asdict().items()})
    targets = case.targets.to(cuda)

    def linear(h, w):
        return ck.fused_linear_calibrl_loss(h, w, targets, b.old_logp, b.advantages, b.mask, **b.kwargs(CONFIG)).loss

    def logits_loss(x):
        return ck.fused_calibrl_loss(x, targets, b.old_logp, b.advantages, b.mask, **b.kwargs(CONFIG)).loss

    hidden, weight = _on(cuda, case.hidden), _on(cuda, case.weight)
    _assert_compiled_equals_eager(linear, [hidden, weight], backend="inductor", rtol=1e-4, atol=1e-5)
    logits = (hidden.detach() @ weight.detach().t()).requires_grad_(True)
    _assert_compiled_equals_eager(logits_loss, [logits], backend="inductor", rtol=1e-4, atol=1e-5)
