"""Two JAX processes train with a vocabulary-parallel loss; the losses equal a one-process run.

    python examples/two_process_training.py

starts two worker processes on 127.0.0.1 (each with 2 CPU devices, JAX's CPU
collectives over gloo), joined by ``jax.distributed.initialize`` into one
4-device mesh ``("vocab", "data")``: the vocabulary axis spans the two
processes, the batch is split over each process' two devices. They train a
small model (features -> tanh projection -> output embedding) for a few optax
Adam steps with :func:`jaxce.sharded.linear_cross_entropy`, each process holding
half of the output embedding. The launcher then runs the same training in one
process with :func:`jaxce.linear_cross_entropy` and checks that every step's
loss agrees to float32 rounding. Exit status 0 means they agree.

The launcher kills its workers if anything fails or ``--timeout`` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

STEPS = 5
BATCH, FEATURES, DIM, VOCAB = 16, 12, 16, 64
OPTIONS: dict[str, Any] = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-4}


def problem() -> tuple[dict[str, Any], Any, Any]:
    """Initial parameters, features and labels, the same in every process."""
    import numpy as np

    rng = np.random.default_rng(0)
    params = {
        "proj": rng.normal(0, 0.5, (FEATURES, DIM)).astype(np.float32),
        "embed": rng.normal(0, 0.3, (VOCAB, DIM)).astype(np.float32),
        "bias": np.zeros(VOCAB, np.float32),
    }
    features = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    labels = rng.integers(0, VOCAB, BATCH).astype(np.int32)
    labels[[3, 10]] = -100
    return params, features, labels


def train(loss_fn: Any, params: Any, features: Any, labels: Any) -> list[float]:
    import jax
    import optax

    optimizer = optax.adam(0.05)

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, features, labels)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = jax.jit(optimizer.init)(params)
    losses = []
    for _ in range(STEPS):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


def worker(process_id: int, port: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxce.sharded

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    # jax.devices() lists process 0's devices first: rows are processes.
    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("vocab", "data"))

    def loss_fn(params: Any, features: jax.Array, labels: jax.Array) -> jax.Array:
        hidden = jnp.tanh(features @ params["proj"])
        return jax.shard_map(
            lambda h, w, b, y: jaxce.sharded.linear_cross_entropy(
                h, w, y, axis_name="vocab", bias_shard=b, batch_axis_name="data", **OPTIONS
            ),
            mesh=mesh,
            in_specs=(P("data"), P("vocab"), P("vocab"), P("data")),
            out_specs=P(),
        )(hidden, params["embed"], params["bias"], labels)

    def place(x: np.ndarray, spec: P) -> jax.Array:
        """A global array from the host copy every process holds."""
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    params, features, labels = problem()
    specs = {"proj": P(), "embed": P("vocab"), "bias": P("vocab")}
    params = {k: place(v, specs[k]) for k, v in params.items()}
    losses = train(loss_fn, params, place(features, P("data")), place(labels, P("data")))
    print("LOSSES " + json.dumps(losses), flush=True)
    jax.distributed.shutdown()


def one_process_losses() -> list[float]:
    import jax
    import jax.numpy as jnp

    import jaxce

    def loss_fn(params: Any, features: jax.Array, labels: jax.Array) -> jax.Array:
        hidden = jnp.tanh(features @ params["proj"])
        return jaxce.linear_cross_entropy(
            hidden, params["embed"], labels, bias=params["bias"], **OPTIONS
        )

    params, features, labels = problem()
    return train(loss_fn, jax.tree.map(jnp.asarray, params), features, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(timeout: float) -> int:
    deadline = time.monotonic() + timeout
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    port = free_port()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(k), "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, log in enumerate(logs)
    ]
    try:
        reference = one_process_losses()
        for w in workers:
            w.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        print(f"workers did not finish within {timeout:.0f} s", file=sys.stderr)
        return 1
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
    if any(w.returncode != 0 for w in workers):
        for k, output in enumerate(outputs):
            print(
                f"--- worker {k} (exit {workers[k].returncode}):\n{output[-4000:]}", file=sys.stderr
            )
        return 1
    results = [
        json.loads(line.removeprefix("LOSSES "))
        for output in outputs
        for line in output.splitlines()
        if line.startswith("LOSSES ")
    ]
    print("step  process 0   process 1   one process")
    for step, row in enumerate(zip(*results, reference, strict=True)):
        print(f"{step:4d}  " + "  ".join(f"{x:10.7f}" for x in row))
    agree = len(results) == 2 and all(
        abs(a - r) <= 1e-5 * max(1.0, abs(r))
        for losses in results
        for a, r in zip(losses, reference, strict=True)
    )
    print("two processes match one process" if agree else "MISMATCH")
    return 0 if agree else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.port)
        return 0
    return launch(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
