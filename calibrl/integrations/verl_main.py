"""Former name of ``python -m calibrl.integrations.verl.main`` (kept so existing launch scripts work)."""

from .verl.main import check_before_ray, main, ray_cpus  # noqa: F401

if __name__ == "__main__":
    main()
