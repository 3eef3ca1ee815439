"""`gara info`: the parameter report, through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys


def run_gara(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gara.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_info_json_reports_gara_on_vit_b_with_the_method_count():
    """ViT-B, GaRA r_L = 16, r_H = 256, separate Q/K/V: 12 * (3 * 272 * 1536 + 79,057 gate
    parameters) = 15,989,196 trainable (formula spelled out in test_adapters)."""
    proc = run_gara("info", "--backbone", "vit_b", "--adapter", "gara", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trainable_params"] == 12 * (3 * 272 * 1536 + 79_057) == 15_989_196
    assert report["total_params"] == 93_735_472 + 15_989_196


def test_info_lora_q_v_rank_4_on_vit_b():
    """WeSAM's setting: LoRA r4 on q and v of 12 blocks: 12 * 2 * 4 * (768 + 768) = 147,456."""
    proc = run_gara("info", "--backbone", "vit_b", "--adapter", "lora", "--rank", "4",
                    "--targets", "q,v", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trainable_params"] == 147_456
    assert {tuple(r["parts"]) for r in report["adapted_layers"]} == {("q", "v")}


def test_info_rejects_unknown_names_in_one_line():
    proc = run_gara("info", "--backbone", "vit_x")
    assert proc.returncode == 2
    assert "unknown backbone 'vit_x'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_gara("info", "--adapter", "dora")
    assert proc.returncode != 0 and "dora" in proc.stderr
