"""eliminate_identity: dropout at inference, cancelling transposes/permutes, no-op reshapes and casts."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: ident
inputs:
  x: f32[B, T, 4]
graph: |
  a = dropout(x, p=0.1)
  b = transpose(transpose(a, 1, 2), 2, 1)
  c = reshape(reshape(b, B, T, 2, 2), B, T, 4)
  d = permute(permute(relu(c), 0, 2, 1), 0, 2, 1)
  y = cast(d, f32)
outputs:
  y:
"""

EXPECTED = """graph ident
  dims B=2, T=8
  %0: f32[B, T, 4] = input(name="x")
  %6: f32[B, T, 4] = relu(%0)
  return y=%6
"""


def test_before_expected():
    assert ir_after(BEFORE, "eliminate_identity") == EXPECTED


def test_dropout_stays_in_a_training_build():
    import specc
    from specc.compiler.passes import PASSES, PassContext, optimize

    ctx = PassContext(opt_level=2, disabled=frozenset(set(PASSES) - {"eliminate_identity"}), inference=False)
    graph, _ = optimize(specc.compile(BEFORE), ctx)
    assert [n.op for _, n in graph.nodes()].count("dropout") == 1


def test_transposes_that_do_not_cancel_stay():
    text = """specc: 1
name: keep
inputs:
  x: f32[B, T, 4]
graph: |
  y = transpose(transpose(x, 1, 2), 0, 2)
outputs:
  y:
"""
    assert ir_after(text, "eliminate_identity").count("transpose(") == 2


test_property = property_test("eliminate_identity", [
    "dropout({v}, p=0.3)", "transpose(transpose({v}, 1, 2), 2, 1)", "permute(permute({v}, 0, 2, 1), 0, 2, 1)",
    "reshape(reshape({v}, B, T, {w}, 1), B, T, {w})", "permute({v}, 0, 1, 2)",
])  # (cast(x, f32) is in BEFORE: an explicit cast would pin the float64 oracle to float32)


STACK = """specc: 1
name: stack
inputs:
  x: f32[B, 4]
blocks:
  step(h): |
    return relu(linear(h, 4))
graph: |
  hs = repeat(3, step, x, stack=true)       # [3, B, 4]
  last = hs[-1]
  first = hs[0, :, :]
  part = hs[1, :, 1:]                        # not a whole step: stays
  y = last + first
outputs:
  y:
  part:
"""


def test_a_step_picked_out_of_a_stack_is_the_step_itself():
    text = ir_after(STACK, "eliminate_identity")
    lines = text.splitlines()
    relus = [line.split(":")[0].strip() for line in lines if "= relu(" in line]
    add = next(line for line in lines if "= add(" in line)
    assert add.endswith(f"add({relus[2]}, {relus[0]})") or f"add({relus[2]}, {relus[0]})" in add, text
    assert text.count("getitem(") == 1 and "index=[1, :, 1:]" in text  # the partial selection stays
    assert text.count("concat(") == 1  # still read by `part`


def test_the_stack_dies_when_only_steps_are_read():
    text = ir_after(STACK.replace("  part = hs[1, :, 1:]                        # not a whole step: stays\n", "")
                    .replace("  part:\n", ""), "eliminate_identity")
    assert "concat(" not in text and "unsqueeze(" not in text and "getitem(" not in text, text


test_stack_property = property_test("eliminate_identity", [
    "concat([unsqueeze({v}, 0), unsqueeze(relu({v}), 0)], dim=0)[1]",
    "concat([unsqueeze({v}, 2), unsqueeze(relu({v}), 2)], dim=2)[:, :, -2]",
])
