#!/usr/bin/env python
"""Verify a compiled model on an execution provider: the reference runs as `onnxc verify` runs it (CPU execution
provider, onnxruntime's graph optimizations off), the candidate on --provider with onnxruntime's default
optimizations, on the same seeded inputs (compiler/verify.py's scenarios), compared with the tolerances of the
precision the candidate computes in. One line per scenario and output; exit 1 on a mismatch, 2 when the provider
is missing.

    python bench/verify_provider.py model.onnx model.onnxc.onnx --provider cuda
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import onnxruntime as ort

from onnxc import benchmark, verify
from onnxc import ir as irio


def check(reference: str, candidate: str, provider: str, seed: int = 0) -> bool:
    """Run and compare one pair (module docstring); print its lines; True when every output agrees."""
    name = benchmark.PROVIDERS[provider]
    model = irio.load(candidate)
    precision = verify.compute_precision(model)
    scenarios = verify.scenarios_for(model)
    feeds_list = [verify.make_inputs(model, sc, seed + k) for k, sc in enumerate(scenarios)]
    refs = verify.run_model(reference, feeds_list)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(candidate, so, providers=[name])
    names = [o.name for o in session.get_outputs()]
    failed = 0
    for sc, feeds, ref in zip(scenarios, feeds_list, refs):
        got = dict(zip(names, session.run(names, verify.narrow_feeds(feeds, session))))
        if sc.pad:
            ref, got = verify._valid_rows(ref, asdict(sc)), verify._valid_rows(got, asdict(sc))
        for out in ref:
            c = verify.compare(ref[out], got[out].astype(ref[out].dtype), out, precision)
            failed += not c.ok
            print(f"{provider} {sc.name:<8} {out:<28} max_abs={c.max_abs:.3g} max_rel={c.max_rel:.3g} "
                  f"(rtol={c.rtol:.3g} atol={c.atol:.3g}) {'ok' if c.ok else 'MISMATCH'}")
    print(f"{candidate} on {name}: {'failed' if failed else 'passed'} ({precision or 'dtype'} tolerances)")
    return not failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="REFERENCE CANDIDATE")
    ap.add_argument("--provider", choices=sorted(benchmark.PROVIDERS), default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if len(args.models) % 2:
        ap.error("give models in pairs: REFERENCE CANDIDATE")
    if benchmark.PROVIDERS[args.provider] not in ort.get_available_providers():
        print(f"verify_provider: onnxruntime has no {benchmark.PROVIDERS[args.provider]}", file=sys.stderr)
        return 2
    bad = 0
    for reference, candidate in zip(args.models[::2], args.models[1::2]):
        try:
            bad += not check(reference, candidate, args.provider, args.seed)
        except Exception as exc:        # noqa: BLE001 - one pair that cannot run does not stop the others
            print(f"{candidate} on {args.provider}: failed: cannot run ({type(exc).__name__}: {exc})".splitlines()[0])
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
