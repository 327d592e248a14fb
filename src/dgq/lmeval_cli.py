"""``dgq-lm-eval``: lm-evaluation-harness's own CLI with dgq checkpoints loadable. ``import dgq`` registers dgq's
transformers quantizer (:mod:`dgq.hf`), so lm-eval's ``--model hf --model_args pretrained=CKPT`` loads a dgq
checkpoint through ``AutoModelForCausalLM.from_pretrained`` (with dgq.load's checks); every argument is lm-eval's
(``lm-eval`` 0.4.13, the ``lmeval`` extra)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) on ``argv`` (default: this process's arguments)."""
    import dgq  # noqa: F401 - registers the dgq quantizer with transformers

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("dgq-lm-eval: error: lm-eval is not installed (pip install 'dgq[lmeval]')", file=sys.stderr)
        return 2
    args = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
