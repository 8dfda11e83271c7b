"""A rack on one host: K instance servers, each with its own cards, behind one router.

    rsd-launch serve --instances 2 --tp 2 --routing prefix-affinity --port 8000

Each instance is an ``rsd-launch serve`` process on a free loopback port with
its own cards and run; the router (``rsd_runtime.router``) listens on
``--port``. SIGINT/SIGTERM stops the router, then every instance and its
cards; an instance that leaves a card process or a segment behind is named.
"""
from __future__ import annotations

import sys

from rsd_runtime.router import Router, serve_router
from rsd_runtime.routing import get_policy
from rsd_runtime.server.launch import ServerError, ServerProcess


def instance_args(args) -> list[str]:
    """The options of ``rsd-launch serve`` that each instance takes from the rack's command line."""
    out = ["--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--fusion", args.fusion,
           "--overlap", str(args.overlap), "--host-overhead", str(args.host_overhead),
           "--stream-interval", str(args.stream_interval)]
    if args.served_model_name:
        out += ["--served-model-name", args.served_model_name]
    if args.max_waiting is not None:
        out += ["--max-waiting", str(args.max_waiting)]
    if args.restart_cards:
        out.append("--restart-cards")
    return out


def serve_rack(args, router_options: dict) -> int:
    if args.instances < 1:
        raise ValueError(f"--instances must be >= 1, got {args.instances}")
    policy = get_policy(args.routing)  # SIGTERM raises SystemExit(0) (cmd_serve): the finally below stops all
    servers = [ServerProcess(model=args.model, tp=args.tp, phantom=args.phantom,
                             shm_prefix=f"{args.shm_prefix}i{i}", extra_args=instance_args(args))
               for i in range(args.instances)]
    try:
        for s in servers:  # all start at once; each waits for its own cards
            s.start(wait=False)
        for i, s in enumerate(servers):
            s.wait_healthy(s.start_timeout)
            print(f"rsd-launch: instance{i} on {s.base_url} ({args.tp} cards)", file=sys.stderr, flush=True)
        router = Router([s.base_url for s in servers], policy, **router_options)
        print(f"rsd-launch: router ({args.routing}) over {args.instances} instances on "
              f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        serve_router(router, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        errors = []
        for i, s in enumerate(servers):
            try:
                s.stop()
            except ServerError as exc:
                errors.append(f"instance{i}: {exc}")
        if errors:
            print("rsd-launch: " + "; ".join(errors), file=sys.stderr)
            return 1
    return 0
