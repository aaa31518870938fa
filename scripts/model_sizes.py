"""Print computed parameter counts next to the papers' model sizes (Markdown table).

    python scripts/model_sizes.py > /tmp/sizes.md

Paper 004 (Attention / LSTM) Tables I-IV give sizes rounded to 1M; paper 001 Table 1 gives
the SSM totals. Counts are of the whole model as registered (detector, second RoI branch,
head), 3 slice classes.
"""

from __future__ import annotations

from ctlesion.registry import count_parameters, create_model

PAPER = {
    # paper 004 Tables III/IV
    "attention-r18": 23, "lstm1-r18": 22, "lstm2-r18": 23,
    "attention-r34": 33, "lstm1-r34": 32, "lstm2-r34": 33,
    "attention-r50": 35, "lstm1-r50": 35, "lstm2-r50": 36,
    "attention-x50": 35, "lstm1-x50": 34, "lstm2-x50": 36,
    "attention-x101": 99, "lstm1-x101": 98, "lstm2-x101": 99,
    "ctm-r50-fpn": 32,  # paper 004 Table II, "COVID-CT-Mask-Net [13]"
    # paper 001 Table 1
    "ssm-r18-s2": 4.51, "ssm-r18-s3": 6.64, "ssm-r34-s2": 5.17, "ssm-r34-s3": 12.04,
    "ssm-2branch-r18-s2": 6.13, "ssm-2branch-r18-s3": 8.27, "ssm-2branch-r34-s2": 6.80, "ssm-2branch-r34-s3": 13.66,
    # paper 004 Table II benchmarks (the paper's counts include a 1000-class ImageNet head)
    "cnn-resnet18": 11, "cnn-resnext50": 25, "cnn-resnext101": 88, "cnn-densenet121": 8, "cnn-densenet169": 14,
}


def main() -> None:
    print("| model | computed (M) | paper (M) | difference (M) |")
    print("|---|---|---|---|")
    for name, paper in PAPER.items():
        params = count_parameters(create_model(name)) / 1e6
        print(f"| `{name}` | {params:.2f} | {paper} | {params - paper:+.2f} |")
    for name in ("affinity-r18", "ctm-r18-s3", "ctm-r34-s3"):
        print(f"| `{name}` | {count_parameters(create_model(name)) / 1e6:.2f} | – | – |")


if __name__ == "__main__":
    main()
