"""The C++ extension's build folder survives a process killed inside torch's build step.

torch marks a build in progress with a ``lock`` file that a killed process never removes; later processes
would wait for it forever. calibrl_kernels.build serialises builds with an flock (released when its holder
dies) and clears such a leftover file under it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from calibrl_kernels.cpu import build


@pytest.mark.skipif(build.fcntl is None, reason="flock needs a POSIX system")
def test_a_lock_file_left_by_a_killed_process_does_not_block_the_next_one():
    if build.extension(fallback_warning=False) is None:
        pytest.fail(f"the C++ extension does not build here: {build.build_error()}")
    folder = build._build_directory(build.extension_name(), False)
    leftover = os.path.join(folder, "lock")
    open(leftover, "w").close()  # what a process killed between torch's lock and its release leaves behind
    code = (
        "from calibrl_kernels.cpu import build; assert build.extension(fallback_warning=False) is not None; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    with build._folder_flock(folder):  # every calibrl process creates torch's lock file only under this flock
        assert not os.path.exists(leftover)
