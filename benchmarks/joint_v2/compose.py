"""One weights file from the identity of one v2 run and the detection of another (issue 15).

Identity runs on face crops train only identity's tensors, and detection runs
only the detection FPN and heads; both leave the shared backbone as it was.
When the two runs started from the same network, the shared tensors of both
files are equal, and the network made of identity's tensors from one and
detection's from the other is exactly what each run measured of its own
part. This script checks that (every tensor that neither part names must be
equal in both files, and the records must agree) and writes that network.

    python benchmarks/joint_v2/compose.py --identity A.pt --detection B.pt --out C.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

from jointface.weights_file import load_weights, write_weights

#: the tensors a detection-only run trains (detection_neck "own")
DETECTION_PREFIXES = ("detection_lateral.", "detection_smooth.", "heads.")
#: the tensors an identity-crops run trains, and the margin head beside the network
IDENTITY_PREFIXES = ("identity_backbone.", "lateral.", "smooth.", "identity_map.", "identity.")


def compose(identity_path: str, detection_path: str) -> tuple[dict, dict]:
    """(payload, report): ``identity_path``'s payload with ``detection_path``'s detection tensors."""
    identity, identity_version = load_weights(identity_path)
    detection, detection_version = load_weights(detection_path)
    differing = sorted(k for k in set(identity["record"]) | set(detection["record"])
                       if not k.startswith("training") and identity["record"].get(k) != detection["record"].get(k))
    if differing:  # the network's shape, anchors and input conventions; how each was trained may differ
        raise SystemExit(f"the two networks differ in their records ({', '.join(differing)}): not composable")
    ours, theirs = identity["state_dict"], detection["state_dict"]
    if set(ours) != set(theirs):
        raise SystemExit("the two weights files hold different tensors: not composable")
    shared = [k for k in ours if not k.startswith(DETECTION_PREFIXES + IDENTITY_PREFIXES)]
    moved = [k for k in shared if not torch.equal(ours[k], theirs[k])]
    if moved:
        raise SystemExit(f"{len(moved)} shared tensors differ between the files (first: {moved[0]}): one run "
                         f"trained what the other reads, so the composed network was measured by neither")
    state = {k: (theirs[k] if k.startswith(DETECTION_PREFIXES) else ours[k]) for k in ours}
    training = dict(identity.get("training") or {})
    training["composed"] = {"identity_from": identity_version, "detection_from": detection_version,
                            "detection_prefixes": list(DETECTION_PREFIXES),
                            "detection_record": {k: v for k, v in detection["record"].items() if k.startswith("training")},
                            "detection_training": {k: (detection.get("training") or {}).get(k)
                                                   for k in ("step", "metrics")}}
    payload = {"record": identity["record"], "state_dict": state,
               "identity_heads": identity.get("identity_heads") or {}, "training": training}
    report = {"identity_from": identity_version, "detection_from": detection_version, "shared_equal": len(shared),
              "detection_tensors": sum(k.startswith(DETECTION_PREFIXES) for k in state)}
    return payload, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identity", required=True)
    parser.add_argument("--detection", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    payload, report = compose(args.identity, args.detection)
    written = write_weights(args.out, format_version=None, **payload)
    print(f"{args.out}: identity {report['identity_from']}, detection {report['detection_from']} "
          f"({report['detection_tensors']} tensors); {report['shared_equal']} shared tensors equal in both; "
          f"version {written['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
