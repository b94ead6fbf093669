"""The zoo specs that exist for specc's own rewrites: each checks, its -O2 IR shows the rewrite, and
the -O2 build agrees with the -O0 one on perturbed weights (specc.verify.verify).

- repvgg: BN folding + RepVGG branch merge leave one conv2d per block (9) and no batch_norm.
- lora_gpt: every LoRA adapter merges into its base linear: no rank-r linear is left.
- glyph_embedding: the table and the per-token layers fold into one embedding table.
"""

from __future__ import annotations

import re
from pathlib import Path

import specc
from specc.verify import verify
from specc.compiler.printer import print_graph

SPECS = Path(__file__).resolve().parents[1] / "specs"


def ir_o2(name: str) -> str:
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(SPECS / f"{name}.yaml"), PassContext(opt_level=2))
    return print_graph(graph, show_span=False)


def ok(name: str) -> bool:
    specc.check(SPECS / f"{name}.yaml")
    return verify(SPECS / f"{name}.yaml", examples=5).ok


def test_repvgg_blocks_become_one_conv_each():
    ir = ir_o2("repvgg")  # 3 stages x (1 stride-2 block + depth=2 identity blocks)
    assert ir.count("= conv2d(") == 9 and "batch_norm" not in ir and "add(" not in ir and ok("repvgg")


def test_lora_gpt_adapters_merge():
    ir = ir_o2("lora_gpt")  # rank r=4: no linear of width 4 and none taking a rank-4 input
    assert not re.search(r"linear\([^)]*out=4,", ir) and ir.count("= linear(") == 5 and ok("lora_gpt")


def test_glyph_embedding_folds_into_one_table():
    ir = ir_o2("glyph_embedding")  # left: one embedding, the mean and the head
    assert ir.count("= embedding(") == 1 and "layer_norm" not in ir and "gelu" not in ir \
        and ir.count("= linear(") == 1 and ok("glyph_embedding")
