"""Writes ``standin-cloud-8x.smollm2-135m.profile.json``: the reference VM's measured profile with
every compute and codec time divided by 8 — an *assumed* stand-in for a server-class cloud worker.

Why: the only measured profiles are of this 2-core VM, whose worker is no faster than its device, so
with them every planner's best plan is edge-only and a learned planner has nothing to learn. Until the
evaluation issue brings a cloud profile from cited figures, training and the policy experiments use this
stand-in; every field it changes is marked ``assumed`` in its provenance and the note says so.

Run: python training/profiles/make_standin_cloud.py
"""

from __future__ import annotations

from pathlib import Path

from splitwise_core.profile import Profile

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
OUT = Path(__file__).resolve().parent / "standin-cloud-8x.smollm2-135m.profile.json"
SPEEDUP = 8.0

SCALED = ("kv_group_s", "ffn_full_s", "ffn_gate_up_s", "ffn_down_s", "norm_s", "add_s", "embed_s", "lm_head_s")


def main() -> None:
    ref = Profile.load(SOURCE)
    data = ref.model_dump()
    for key in SCALED:
        data[key] = data[key] / SPEEDUP
    data["attention"]["seconds"] = [[s / SPEEDUP for s in row] for row in data["attention"]["seconds"]]
    for codec in data["codecs"].values():
        codec["encode_s_per_byte"] /= SPEEDUP
        codec["decode_s_per_byte"] /= SPEEDUP
    data["machine"] = f"stand-in cloud worker: {ref.machine} x{SPEEDUP:g} (assumed)"
    data["provenance"] = {**data["provenance"], **dict.fromkeys((*SCALED, "attention", "codecs"), "assumed")}
    data["note"] = (
        f"ASSUMED, not measured: {SOURCE.name} with every compute and codec time divided by {SPEEDUP:g}, a "
        "stand-in for a server-class cloud worker (training/profiles/make_standin_cloud.py says why). "
        f"Source note: {ref.note}"
    )
    out = Profile.model_validate(data)
    OUT.write_text(out.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
