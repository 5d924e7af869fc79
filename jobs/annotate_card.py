"""Add data sources, notes and settings to a trained model's card (thin entry point).

A model trained on a prepared crop set (`jobs/build_crop_set.py`) knows only
the folder it read; this records what the folder was made of, how single-cell
images are to be prepared for it (``--extra source_mpp=0.08`` ...), and
caveats, in the sidecar JSON, the markdown and the card embedded in the
``.pt`` (which changes the file's SHA-256, recorded in the card).

    python jobs/annotate_card.py --model runs/wbc/wbc_type.pt \\
        --source '{"name": "PBC", "url": "...", "licence": "CC BY 4.0"}' \\
        --note 'PBC has no patient ids' --extra recrop=true --extra source_mpp=0.08
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.models import read_model_card, write_model_card  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="annotate_card", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="the .pt whose card to extend")
    p.add_argument("--source", action="append", default=[], metavar="JSON", help="a data source")
    p.add_argument("--note", action="append", default=[], help="a caveat")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=JSON", help="a setting")
    args = p.parse_args(argv)
    card = read_model_card(args.model)
    if card is None:
        p.error(f"{args.model} has no model card")
    card.data_sources += [json.loads(s) for s in args.source]
    card.notes += args.note
    for item in args.extra:
        key, _, value = item.partition("=")
        card.extra[key] = json.loads(value)
    write_model_card(card, args.model)
    if card.task == "classify":
        from batch.train.classifier_card import write_classifier_markdown

        write_classifier_markdown(args.model)
    print(args.model.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
