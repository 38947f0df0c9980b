"""The table ``shiftlab consistency`` prints and saves: one row per model."""
from __future__ import annotations

from typing import Sequence

import pandas as pd


def consistency_table(results: Sequence) -> pd.DataFrame:
    """One row per model: its label, weights and every number of ``InvarianceResult.summary()``."""
    rows = []
    for result in results:
        rows.append({"model": result.label, "weights": result.provenance.weights, **result.summary()})
    return pd.DataFrame(rows)


def format_consistency(table: pd.DataFrame) -> str:
    """Pairwise consistency with its bootstrap interval and the number of images behind it,
    consistency vs. the unshifted image, the share consistent under every shift, flip rate,
    MAC, accuracy (with labels) and the count of non-finite outputs left out."""
    def column(name: str, fmt: str = "{:.3f}") -> list:
        return [fmt.format(v) if pd.notna(v) else "-" for v in table[name]]

    if "protocol" in table and table["protocol"].notna().all():
        return _format_protocol(table, column)
    if "massc" in table:
        return _format_dense(table, column)

    shown = pd.DataFrame({"model": table["model"]})
    shown["consistency (pairs)"] = column("pairwise_consistency")
    shown["95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in
                       zip(table["pairwise_ci_low"], table["pairwise_ci_high"])]
    shown["pairs"] = table["n_pairs"]
    shown["images"] = table["n_images"]
    shown["vs reference"] = column("consistency_vs_reference")
    if "consistent_all_shifts" in table:
        shown["consistent at every shift"] = column("consistent_all_shifts")
    shown["flip rate"] = column("flip_rate")
    shown["MAC"] = column("mac", "{:.4f}")
    if "accuracy" in table and table["accuracy"].notna().any():
        shown["accuracy"] = column("accuracy")
        if "accuracy_ci_low" in table:
            shown["acc. 95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in
                                    zip(table["accuracy_ci_low"], table["accuracy_ci_high"])]
        if "correct_all_shifts" in table:
            shown["correct at every shift"] = column("correct_all_shifts")
    if "n_nonfinite" in table and (table["n_nonfinite"] > 0).any():
        shown["non-finite (left out)"] = table["n_nonfinite"]
    return shown.to_string(index=False)


def _format_protocol(table: pd.DataFrame, column) -> str:
    """The paper's protocols: consistency over random window pairs, or the diagonal sweep."""
    shown = pd.DataFrame({"model": table["model"], "protocol": table["protocol"]})
    if (table["protocol"] == "zhang2019").all():
        shown["consistency"] = column("consistency")
        shown["95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(table["ci_low"], table["ci_high"])]
        shown["pairs"] = table["n_pairs"]
    else:
        for name in ("probability", "probability_min_t", "consistent_all_offsets"):
            if name in table:
                shown[name.replace("_", " ")] = column(name)
    shown["images"] = table["n_images"]
    if table["accuracy"].notna().any():
        shown["accuracy"] = column("accuracy")
        shown["acc. 95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "-" for lo, hi in
                                zip(table["accuracy_ci_low"], table["accuracy_ci_high"])]
    if (table["n_nonfinite"] > 0).any():
        shown["non-finite (left out)"] = table["n_nonfinite"]
    return shown.to_string(index=False)


def _format_dense(table: pd.DataFrame, column) -> str:
    """Dense models: pixel agreement (mASSC over pairs, vs. the unshifted output), output
    distance, EQ-T, and mIoU / pixel accuracy with masks."""
    def interval(low: str, high: str) -> list:
        return [f"[{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "-" for lo, hi in
                zip(table[low], table[high])]

    shown = pd.DataFrame({"model": table["model"]})
    shown["mASSC (pairs)"] = column("massc")
    shown["95% CI"] = interval("massc_ci_low", "massc_ci_high")
    shown["pairs"] = table["n_pairs"]
    shown["images"] = table["n_images"]
    shown["vs reference"] = column("agreement")
    shown["worst shift"] = column("worst_shift_agreement")
    shown["output cosine"] = column("output_cosine", "{:.4f}")
    shown["EQ-T (dB)"] = column("eq_t_db", "{:.1f}")
    if "miou" in table and table["miou"].notna().any():
        shown["mIoU"] = column("miou")
        shown["mIoU 95% CI"] = interval("miou_ci_low", "miou_ci_high")
        shown["mIoU worst shift"] = column("miou_worst_shift")
        shown["pixel acc."] = column("pixel_accuracy")
    if (table["n_nonfinite"] > 0).any():
        shown["non-finite pixels (left out)"] = table["n_nonfinite"]
    return shown.to_string(index=False)
