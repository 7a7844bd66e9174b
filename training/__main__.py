"""``python -m training``: one training run in this process, without the command line.

``drpipe tune`` starts each grid point so, as a process of its own (memory is returned
between points; a crash ends that point only)::

    python -m training --options JSON [--version N]   # a new run: drpipe train's options
    python -m training --resume RUN                   # continue RUN from its last epoch

JSON holds TrainConfig fields (training/config.py), as drpipe train parsed them. Output is
``drpipe train``'s: the log of the run, its validation metrics in one line, and a failure
as one ``drpipe: error: ...`` line with exit code 1 (2 for an option that cannot be used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from training import WeightsUnavailable
from training.fit import OptionError, metrics_line, new_config, resume_config, train
from training.runs import RunError
from training.tflogs import install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--options", help="a new run's options (JSON object)")
    what.add_argument("--resume", help="a run directory to continue")
    parser.add_argument("--version", type=int, default=None)
    args = parser.parse_args(argv)
    if args.resume and args.version is not None:
        parser.error("--version is for a new run (a resumed run keeps its data version)")
    # Line by line into the point's log, as drpipe train's click.echo did: a kill loses
    # nothing already said.
    sys.stdout.reconfigure(line_buffering=True)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    install()  # TensorFlow's native start-up lines hidden, as under drpipe (no TF yet)

    try:
        cfg = (resume_config(args.resume) if args.resume
               else new_config(json.loads(args.options), args.version))
        result = train(cfg, resume=bool(args.resume))
    except OptionError as e:
        print(f"drpipe: error: {e}", file=sys.stderr)
        return 2
    except (RunError, WeightsUnavailable, FileNotFoundError, ValueError) as e:
        print(f"drpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("drpipe: error: interrupted (tune resumes the point)", file=sys.stderr)
        return 130
    except Exception as e:  # as drpipe's own catch-all: one line for tune's summary
        if os.environ.get("DRPIPE_DEBUG"):
            raise
        print(f"drpipe: internal error: {type(e).__name__}: {e} "
              "(set DRPIPE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print(metrics_line(result, cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
