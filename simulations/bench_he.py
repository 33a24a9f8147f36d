"""HE-FedAvg benchmark, side by side in one run (Fashion-MNIST CNN, 10 clients).

``python -m simulations.bench_he [--rounds 3] [--skip-simulation]`` prints:

1. bytes on the wire per parameter, as a multiple of float32: our packed uploads (c0
   with 4 low bits dropped, c1's seed), the downloaded sum (c0 with 12 low bits dropped,
   c1 packed) and the exact sum the server keeps, TenSEAL's plain CKKS vectors at our
   parameters, and NVIDIA FLARE's default parameters (N=8192, [60, 40, 40], public-key
   encryption);
2. client encryption time of a 1M-parameter update, one core against all cores;
3. server aggregation of 10 encrypted 1M-parameter updates, deserialization included;
4. decryption of the sum of 10 such updates, flooding included (one core);
5. round time of HE-FedAvg and of HE + DP over FedAvg, simulations with the same seeds.

Results also go to ``outputs/bench_he/results.json``. Times are medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts

from lepton_flwr.he import (
    CkksAdder,
    CkksEncoder,
    CKKSParams,
    EncryptedModel,
    create_secret_context,
    flatten,
    public_context_bytes,
)

FLOAT32 = 4.0


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cnn_update() -> np.ndarray:
    """A realistic update vector: the Fashion-MNIST CNN's initial weights."""
    import torch

    from lepton_flwr.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "cnn"}, (1, 28, 28), 10)
    vector, _ = flatten({k: v.numpy() for k, v in model.state_dict().items()})
    return vector


def wire_bytes(vector: np.ndarray, context: ts.Context, public: ts.Context) -> dict[str, float]:
    """Bytes per parameter of each way to ship the vector encrypted."""
    n = len(vector)
    encoder, adder = CkksEncoder(context), CkksAdder(public)
    upload = EncryptedModel([], encoder.encrypt(vector * 4.8), 4.8, "x", 1.0)
    up = sum(map(len, upload.chunks)) + len(json.dumps(upload.header()))
    sums, _ = adder.sum_updates([upload.chunks] * 10)
    kept = sum(map(len, sums))
    down = sum(map(len, adder.download(sums, 10)))

    def tenseal_vectors(ctx: ts.Context) -> float:
        slots = ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
        return sum(
            len(ts.ckks_vector(ctx, vector[i : i + slots]).serialize()) for i in range(0, n, slots)
        )

    params = CKKSParams()
    plain_ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    plain_ctx.global_scale = 2.0**params.scale_bits
    flare = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    flare.global_scale = 2.0**40
    return {
        "ours_upload_packed": up / n,
        "ours_download_sum": down / n,
        "ours_exact_sum_kept": kept / n,
        "tenseal_ckks_vector_same_params": tenseal_vectors(plain_ctx) / n,
        "flare_default_N8192_60_40_40": tenseal_vectors(flare) / n,
    }


def encryption_times(context: ts.Context, repeats: int) -> dict[str, float]:
    """Seconds to encrypt 1M parameters on one core and on all cores."""
    vector = np.random.default_rng(0).normal(size=1_000_000)
    one, many = CkksEncoder(context, workers=1), CkksEncoder(context)
    many.encrypt(vector[:300_000])  # start the worker processes outside the timing
    return {
        "one_core_s": _median_time(lambda: one.encrypt(vector), repeats),
        "all_cores_s": _median_time(lambda: many.encrypt(vector), repeats),
        "cores": many.workers,
    }


def aggregation_times(context: ts.Context, public: ts.Context, repeats: int) -> dict[str, float]:
    """Seconds for the server to check and add 10 encrypted 1M-parameter updates.

    Packed uploads (parsing, range checks and seed expansion included), on one core and
    on all cores; and the download copy of the sum (c0 rounded, packed), on one core.
    """
    adder = CkksAdder(public)
    rng = np.random.default_rng(1)
    encoder = CkksEncoder(context)
    uploads = [encoder.encrypt(rng.normal(size=1_000_000)) for _ in range(10)]
    out = {}
    for workers, label in ((1, "one_core"), (None, "all_cores")):
        out[f"packed_{label}_s"] = _median_time(
            lambda w=workers: adder.sum_updates(uploads, w), repeats
        )
    sums, _ = adder.sum_updates(uploads, 1)
    out["download_copy_one_core_s"] = _median_time(lambda: adder.download(sums, 10), repeats)
    return out


def decryption_time(context: ts.Context, public: ts.Context, repeats: int) -> dict[str, float]:
    """Seconds for a key holder to decrypt the sum of 10 1M-parameter updates (one core).

    Loading and checking the chunks, decrypting and flooding (:meth:`CkksEncoder.decrypt`),
    by a key holder that has not loaded them before; and again by one that has (it keeps
    the last download's exact decryption: every client of a simulation process decrypts the
    same model), flooding afresh.
    """
    adder = CkksAdder(public)
    values = np.random.default_rng(2).normal(size=1_000_000)
    upload = CkksEncoder(context, workers=1).encrypt(values)
    sums, _ = adder.sum_updates([upload] * 10, 1)
    encoders = [CkksEncoder(context, workers=1) for _ in range(repeats)]
    first = _median_time(lambda: encoders.pop().decrypt(sums, 1_000_000, 10.0), repeats)
    again = CkksEncoder(context, workers=1)
    again.decrypt(sums, 1_000_000, 10.0)
    return {
        "one_core_s": first,
        "again_one_core_s": _median_time(lambda: again.decrypt(sums, 1_000_000, 10.0), repeats),
    }


def round_times(rounds: int) -> dict[str, dict]:
    """Median round seconds of FedAvg and HE-FedAvg.

    Round 1 (Ray's start) is left out, and so is the server's central evaluation,
    which only the plaintext run can do: the rounds compared are train + federated
    evaluation, the same work for both.
    """
    from lepton_flwr.config import load_config
    from simulations.run import run_simulation_from_config

    out = {}
    # HE + DP samples every client (fixed size, q=1) so that all three do the same work.
    # Federated evaluation is on in all three (DP strategies turn it off by default).
    dp = (
        "privacy.sampling=fixed privacy.sample_rate=1.0 privacy.delta=1e-3 "
        "strategy.fraction_evaluate=1.0"
    )
    for strategy, extra in (("fedavg", ""), ("he_fedavg", ""), ("he_dp_fedavg", dp)):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{strategy}-"))
        cfg = load_config(f"strategy={strategy} num_rounds={rounds} {extra}")
        run_simulation_from_config(cfg, folder)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        out[strategy] = {
            "median_round_s": statistics.median(
                r["round_seconds"] - r["server_eval_seconds"] for r in rows[1:]
            ),
            "federated_accuracy": rows[-1]["federated_accuracy"],
            "bytes_up_per_round": rows[-1]["bytes_up"],
            "bytes_down_per_round": rows[-1]["bytes_down"],
        }
    return out


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()

    context = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(context))
    vector = cnn_update()
    results: dict = {"cnn_parameters": len(vector)}
    results["bytes_per_param"] = wire_bytes(vector, context, public)
    results["encrypt_1M"] = encryption_times(context, args.repeats)
    results["aggregate_10x1M"] = aggregation_times(context, public, args.repeats)
    results["decrypt_sum_1M"] = decryption_time(context, public, args.repeats)
    if not args.skip_simulation:
        results["simulation"] = round_times(args.rounds)

    print(f"\nFashion-MNIST CNN: {len(vector):,} parameters")
    print("bytes on the wire per parameter (multiple of float32):")
    for name, value in results["bytes_per_param"].items():
        print(f"  {name:34s} {value:6.2f} B  {value / FLOAT32:5.2f}x")
    enc = results["encrypt_1M"]
    print(
        f"client encryption of 1M parameters: {enc['one_core_s']:.3f} s on one core, "
        f"{enc['all_cores_s']:.3f} s on {enc['cores']} cores "
        f"(speed-up {enc['one_core_s'] / enc['all_cores_s']:.2f}x)"
    )
    print("server aggregation of 10 x 1M encrypted parameters, deserialization included:")
    for name, value in results["aggregate_10x1M"].items():
        print(f"  {name:22s} {value:.3f} s")
    dec = results["decrypt_sum_1M"]
    print(
        f"decryption of the sum of 10 x 1M (flooding included): {dec['one_core_s']:.3f} s "
        f"on one core, {dec['again_one_core_s']:.3f} s again (its exact decryption kept)"
    )
    if "simulation" in results:
        sim = results["simulation"]
        ratio = sim["he_fedavg"]["median_round_s"] / sim["fedavg"]["median_round_s"]
        results["round_time_ratio"] = ratio
        results["round_time_ratio_he_dp"] = (
            sim["he_dp_fedavg"]["median_round_s"] / sim["fedavg"]["median_round_s"]
        )
        for name, row in sim.items():
            print(
                f"  {name:10s} median round {row['median_round_s']:.2f} s, "
                f"accuracy {row['federated_accuracy']:.4f}"
            )
        print(f"round time HE-FedAvg / FedAvg: {ratio:.3f}x")
        print(f"round time HE+DP / FedAvg: {results['round_time_ratio_he_dp']:.3f}x")
    out = Path("outputs/bench_he")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
