"""``wanwu run --ray``'s options: which cluster, and how the job uses it."""

from __future__ import annotations

import argparse

from wanwu.pipeline.cli.options import positive_int


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """The ``--ray`` group of ``wanwu run``."""
    g = p.add_argument_group("cluster", "run the same stages on a Ray cluster through Ray Data (wanwu[ray])")
    g.add_argument("--ray", metavar="ADDRESS", default="",
                   help="local (a Ray instance for this job, on 127.0.0.1), auto, HOST:PORT or ray://HOST:PORT; "
                        "every node must see the inputs at the same paths and have wanwu installed")
    g.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="classifier actors (0: one per GPU with --ray-actor-gpus, else one per 4 cluster CPUs)")
    g.add_argument("--ray-actor-cpus", type=float, default=1.0, metavar="C", help="CPUs each classifier actor reserves")
    g.add_argument("--ray-actor-gpus", type=float, default=0.0, metavar="G",
                   help="GPUs each classifier actor reserves (its engine then runs on that GPU)")
    g.add_argument("--ray-shard-size", type=positive_int, default=1000, metavar="N",
                   help="inputs per read task (each reads and decodes its shard on a CPU)")


def ray_config(args: argparse.Namespace):  # noqa: ANN201 - RayConfig, imported lazily
    """The ``RayConfig`` of parsed options (None without ``--ray``)."""
    if not args.ray:
        return None
    from wanwu.pipeline.cluster.runner import RayConfig

    return RayConfig(args.ray, actors=args.ray_actors, actor_cpus=args.ray_actor_cpus,
                     actor_gpus=args.ray_actor_gpus, shard_size=args.ray_shard_size)
