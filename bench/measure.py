"""One measurement in a fresh process: ``python -m wanwu.bench.measure KIND JSON-ARGS``.

Prints one JSON object (``{"rate": images/s, ...}``) on stdout. Running each
measurement in its own process lets the suite sample the peak memory of its
whole process tree and keeps thread settings from leaking between them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    kind, args = argv[0], json.loads(argv[1])
    paths = [Path(p) for p in args.get("paths", ())]
    if kind == "wanwu":
        from wanwu.bench.gate import timed_run

        result = timed_run(args["inputs"], args["out"], args["options"])
    elif kind == "api":
        from wanwu.bench.stages import api_rate

        result = {"rate": api_rate(paths, args["options"])}
    elif kind == "baseline":
        from wanwu.bench.baselines import RUNNERS, Settings

        settings = Settings(**args["settings"])
        result = {"rate": RUNNERS[args["name"]](paths, args["model"], settings)}
    elif kind == "decode":
        from wanwu.bench.stages import archive_values, decode_bytes_rate, decode_rate
        from wanwu.stages.decoders.base import resolve_decoder_name

        if args.get("archive"):
            datas = archive_values(args["archive"])
            result = {"rate": decode_bytes_rate(datas, args["processes"], args["decoder"], args["model"])}
        else:
            result = {"rate": decode_rate(paths, args["processes"], args["decoder"], args["model"])}
        result["decoder"] = resolve_decoder_name(args["decoder"])
    elif kind == "inference":
        from wanwu.bench.stages import inference_rate

        rate, label = inference_rate(len(paths), args["batch_size"], args["engine"], 0, args["model"], paths,
                                     args.get("precision", "auto"))
        result = {"rate": rate, "engine": label}
    elif kind == "agreement":
        from wanwu.bench.stages import precision_agreement

        result = {"rate": 0.0, "precisions": precision_agreement(paths, args["precisions"], model=args["model"])}
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
