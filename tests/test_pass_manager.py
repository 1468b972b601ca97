"""The pass manager (onnxc.pass_manager): registry, pipeline text, running with the verifier in between."""
from __future__ import annotations

import textwrap

import onnx_ir as ir
import pytest
from helpers import parse, to_bytes
from onnxc import pass_manager as pm
from onnxc.errors import PassError, UsageError
from onnxc.pass_manager import (
    FixedPoint,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    RulePass,
    filter_passes,
    get_pass,
    load_plugin,
    parse_pipeline,
    register_pass,
)
from onnxc.rules import Rule

SIMPLE = """
g (float[2, 3] x) => (float[2, 3] y) {
  a = Neg(x)
  b = Identity(a)
  y = Relu(b)
}"""


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into a copy of the registry, so nothing leaks between tests."""
    pm.registered_passes()  # load entry points into the real registry first
    monkeypatch.setattr(pm, "_REGISTRY", dict(pm._REGISTRY))
    return pm._REGISTRY


def make_pass(name: str, fn=None, *, level: int = 1, targets=pm.TARGETS) -> Pass:
    """A pass whose run is `fn(model) -> PassResult | anything`; by default it changes nothing."""
    cls = type(f"P_{name.replace('-', '_')}", (Pass,), {
        "name": name, "level": level, "targets": targets,
        "run": lambda self, model, ctx: fn(model) if fn else PassResult(model, False),
    })
    return cls()


def remove_first_node(model: ir.Model) -> PassResult:
    model.graph.remove(next(iter(model.graph)), safe=False)  # its output is still used: a dangling use
    return PassResult(model, True, {"removed": 1})


# ------------------------------------------------------------------------------------------------ registry
def test_pass_manager_register_class_as_decorator(registry):
    @register_pass
    class CountNodes(Pass):
        """Count nodes."""

        name = "test-count-nodes"
        level = 2

        def run(self, model, ctx):
            return PassResult(model, False, {"nodes": sum(1 for _ in model.graph)})

    assert isinstance(CountNodes, type)  # the decorator gives the class back
    p = get_pass("test-count-nodes")
    assert isinstance(p, CountNodes) and p.level == 2 and p.summary == "Count nodes."
    assert "test-count-nodes" in pm.registered_passes()
    assert p.run(parse(SIMPLE), PassContext()).counts == {"nodes": 3}


def test_pass_manager_register_instance():
    rp = RulePass("test-rule-pass", [Rule("r-neg", lambda op, x: op.Neg(x), lambda op, x: op.Neg(x))], level=3,
                  targets=("cuda",))
    assert register_pass(rp) is rp
    assert get_pass("test-rule-pass") is rp
    assert [r.name for r in rp.rules()] == ["r-neg"]
    assert pm.all_rules()["r-neg"] == (rp, rp.rules()[0])


def test_pass_manager_refuses_duplicate_name_from_another_class():
    with pytest.raises(UsageError, match="a pass named 'remove-noops' is already registered"):
        register_pass(make_pass("remove-noops"))
    assert isinstance(get_pass("remove-noops"), RulePass)


def test_pass_manager_refuses_duplicate_rule_pass_name():
    original = get_pass("remove-noops")
    with pytest.raises(UsageError, match="already registered"):
        register_pass(RulePass("remove-noops", []))
    assert get_pass("remove-noops") is original


@pytest.mark.parametrize("name", ["", " padded", "a,b", "fixpoint(x)"])
def test_pass_manager_refuses_invalid_names(name):
    with pytest.raises(UsageError, match="invalid pass name"):
        register_pass(make_pass(name))


@pytest.mark.parametrize("name", ["a)b", "my pass"])
def test_pass_manager_refuses_names_pipelines_cannot_spell(name):
    with pytest.raises(UsageError, match="invalid pass name"):
        register_pass(make_pass(name))


def test_pass_manager_refuses_non_pass_objects():
    with pytest.raises(UsageError, match="needs an onnxc Pass"):
        register_pass(object())  # type: ignore[arg-type]


def test_pass_manager_builtins_are_registered():
    names = set(pm.registered_passes())
    assert {"fold-constants", "remove-noops", "eliminate-dead", "eliminate-cse", "infer-shapes",
            "sort-topologically"} <= names
    assert "remove-identity" in pm.all_rules()


# ------------------------------------------------------------------------------------------------ pipeline text
def test_pass_manager_parse_pipeline_with_fixpoint_group():
    passes = parse_pipeline("fold-constants, fixpoint(remove-noops,\neliminate-dead)")
    assert [p.name for p in passes] == ["fold-constants", "fixpoint(remove-noops,eliminate-dead)"]
    group = passes[1]
    assert isinstance(group, FixedPoint)
    assert group.passes == [get_pass("remove-noops"), get_pass("eliminate-dead")]
    assert [p.name for p in pm.flatten(passes)] == ["fold-constants", "remove-noops", "eliminate-dead"]


def test_pass_manager_parse_pipeline_nested_and_empty():
    passes = parse_pipeline("fixpoint(fixpoint(remove-noops),eliminate-cse)")
    assert len(passes) == 1 and isinstance(passes[0].passes[0], FixedPoint)
    assert parse_pipeline("") == []


@pytest.mark.parametrize("text, message", [
    ("fold-constant", "unknown pass 'fold-constant'; did you mean 'fold-constants'?"),
    ("fold-constants,fixpoint(remove-noop)", "unknown pass 'remove-noop'; did you mean 'remove-noops'?"),
    ("eliminate-dead,sort-topologicaly", "did you mean 'sort-topologically'?"),
    ("repeat(remove-noops)", "unknown group 'repeat('"),
    ("fixpoint(remove-noops", "missing ')'"),
    ("remove-noops)", "unexpected ')'"),
])
def test_pass_manager_parse_pipeline_errors(text, message):
    with pytest.raises(UsageError) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_pass_manager_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UsageError) as info:
        get_pass("zzzzzz")
    assert str(info.value) == "unknown pass 'zzzzzz'"


def test_pass_manager_parse_pipeline_sees_newly_registered_passes():
    register_pass(make_pass("test-late"))
    assert [p.name for p in parse_pipeline("test-late")] == ["test-late"]


# ------------------------------------------------------------------------------------------------ filtering
def test_pass_manager_filter_passes_by_level_target_and_name():
    low = make_pass("test-low", level=1)
    high = make_pass("test-high", level=3)
    cuda = make_pass("test-cuda", targets=("cuda",))
    group = FixedPoint([low, high], max_iterations=4)
    passes = [low, high, cuda, group]
    keep = filter_passes(passes, PassContext(level=2, target="cpu"), frozenset())
    assert [p.name for p in keep] == ["test-low", "fixpoint(test-low)"]
    assert keep[1].max_iterations == 4
    keep = filter_passes(passes, PassContext(level=3, target="cuda"), frozenset({"test-low"}))
    assert [p.name for p in keep] == ["test-high", "test-cuda", "fixpoint(test-high)"]
    assert filter_passes([FixedPoint([high])], PassContext(level=1), frozenset()) == []


# ------------------------------------------------------------------------------------------------ running
def test_pass_manager_runs_passes_and_records():
    seen = []
    manager = PassManager(parse_pipeline("remove-noops,eliminate-dead"), progress=seen.append)
    model = manager.run(parse(SIMPLE), PassContext())
    assert [n.op_type for n in model.graph] == ["Neg", "Relu"]
    assert [(r.name, r.modified, r.counts, r.nodes_after) for r in manager.records] == [
        ("remove-noops", True, {"remove-identity": 1}, 2), ("eliminate-dead", False, {}, 2)]
    assert seen == manager.records


def test_pass_manager_rule_pass_honours_disabled_rules():
    model = parse(SIMPLE)
    result = get_pass("remove-noops").run(model, PassContext(disabled_rules=frozenset({"remove-identity"})))
    assert not result.modified and result.counts == {}
    assert [n.op_type for n in model.graph] == ["Neg", "Identity", "Relu"]


def test_pass_manager_names_pass_that_breaks_graph():
    register_pass(make_pass("test-break", remove_first_node))
    manager = PassManager(parse_pipeline("sort-topologically,remove-noops,test-break,eliminate-dead"))
    with pytest.raises(PassError) as info:
        manager.run(parse(SIMPLE), PassContext())
    err = info.value
    assert err.pass_name == "test-break"
    assert err.previous == ("sort-topologically", "remove-noops")
    assert str(err).startswith("pass 'test-break' (after sort-topologically, remove-noops): left an invalid graph: ")
    assert "dangles: its producer was removed" in str(err)
    assert err.exit_code == 4


def test_pass_manager_verify_at_end_only():
    register_pass(make_pass("test-break", remove_first_node))
    manager = PassManager(parse_pipeline("test-break,eliminate-cse"), verify_each=False)
    with pytest.raises(PassError) as info:
        manager.run(parse(SIMPLE), PassContext())
    assert info.value.pass_name == "end of pipeline"
    assert info.value.previous == ("test-break", "eliminate-cse")


def test_pass_manager_verifies_pass_that_reports_no_change():
    def silent_break(model):
        remove_first_node(model)
        return PassResult(model, False)

    register_pass(make_pass("test-silent-break", silent_break))
    with pytest.raises(PassError, match="test-silent-break"):
        PassManager(parse_pipeline("test-silent-break")).run(parse(SIMPLE), PassContext())


def test_pass_manager_names_pass_that_raises():
    def boom(model):
        raise RuntimeError("boom\nsecond line")

    register_pass(make_pass("test-raise", boom))
    with pytest.raises(PassError) as info:
        PassManager(parse_pipeline("remove-noops,test-raise")).run(parse(SIMPLE), PassContext())
    assert str(info.value) == "pass 'test-raise' (after remove-noops): RuntimeError: boom"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_pass_manager_rejects_non_pass_result():
    register_pass(make_pass("test-none", lambda model: None))
    with pytest.raises(PassError, match="pass 'test-none': returned NoneType, not PassResult"):
        PassManager(parse_pipeline("test-none")).run(parse(SIMPLE), PassContext())


def test_pass_manager_fixpoint_that_never_converges():
    register_pass(make_pass("test-always", lambda model: PassResult(model, True)))
    manager = PassManager([FixedPoint([get_pass("test-always")], max_iterations=3)])
    with pytest.raises(PassError) as info:
        manager.run(parse(SIMPLE), PassContext())
    assert info.value.pass_name == "fixpoint(test-always)"
    assert "did not reach a fixed point within 3 iterations" in str(info.value)
    assert len(manager.records) == 3


def test_pass_manager_fixpoint_stops_when_nothing_changes():
    left = [2]

    def countdown(model):
        left[0] -= 1
        return PassResult(model, left[0] >= 0)

    register_pass(make_pass("test-countdown", countdown))
    manager = PassManager(parse_pipeline("fixpoint(test-countdown,eliminate-dead)"))
    manager.run(parse(SIMPLE), PassContext())
    assert [r.modified for r in manager.records if r.name == "test-countdown"] == [True, True, False]


def test_pass_manager_cleanup_fixpoint_converges_on_builtins():
    model = parse("""
    g (float[2, 3] x) => (float[2, 3] y) {
      c = Constant<value = float {0.0}>()
      a = Add(x, c)
      b = Identity(a)
      s = Shape(b)
      r = Reshape(b, s)
      y = Relu(r)
    }""")
    manager = PassManager(parse_pipeline(
        "infer-shapes,fixpoint(fold-constants,remove-noops,eliminate-cse,eliminate-dead),sort-topologically"))
    model = manager.run(model, PassContext())
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert model.graph.initializers == {}


def test_pass_manager_rejects_renamed_graph_output():
    def rename(model):
        model.graph.outputs[0].name = "renamed"
        return PassResult(model, True)

    register_pass(make_pass("test-rename", rename))
    with pytest.raises(PassError, match=r"graph outputs changed: \['y'\] -> \['renamed'\]"):
        PassManager(parse_pipeline("test-rename")).run(parse(SIMPLE), PassContext())


def test_pass_manager_rejects_changed_graph_input_type_and_rank():
    def retype(model):
        x = model.graph.inputs[0]
        x.type = ir.TensorType(ir.DataType.DOUBLE)
        x.shape = ir.Shape([6])
        return PassResult(model, True)

    register_pass(make_pass("test-retype", retype))
    with pytest.raises(PassError) as info:
        PassManager(parse_pipeline("test-retype")).run(parse(SIMPLE), PassContext())
    assert "graph input 'x' changed element type 1 -> 11 (+1 more)" in str(info.value)


def test_pass_manager_rejects_dropped_graph_input():
    def drop(model):
        model.graph.inputs.pop()
        return PassResult(model, True)

    register_pass(make_pass("test-drop-input", drop))
    with pytest.raises(PassError, match=r"graph inputs changed: \['x'\] -> \[\]"):
        PassManager(parse_pipeline("test-drop-input")).run(parse(SIMPLE), PassContext())


# ------------------------------------------------------------------------------------------------ plugins
def test_pass_manager_load_plugin_registers_pass(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent('''
        import onnxc
        from onnxc.pass_manager import Pass, PassResult

        @onnxc.register_pass
        class DropRelu(Pass):
            """Replace the graph's Relu feeding the output by Neg (for tests)."""
            name = "test-plugin-pass"

            def run(self, model, ctx):
                for node in list(model.graph):
                    if node.op_type == "Relu":
                        node.op_type = "Neg"
                        return PassResult(model, True, {"relu": 1})
                return PassResult(model, False)
    '''))
    load_plugin(plugin)
    manager = PassManager(parse_pipeline("test-plugin-pass"))
    model = manager.run(parse(SIMPLE), PassContext())
    assert [n.op_type for n in model.graph] == ["Neg", "Identity", "Neg"]
    assert manager.records[0].counts == {"relu": 1}


def test_pass_manager_load_plugin_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_plugin(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise KeyError('nope')\n")
    with pytest.raises(UsageError, match="failed to load: KeyError"):
        load_plugin(broken)
    duplicate = tmp_path / "dup.py"
    duplicate.write_text(textwrap.dedent('''
        import onnxc
        from onnxc.pass_manager import Pass

        @onnxc.register_pass
        class Clash(Pass):
            name = "fold-constants"
    '''))
    with pytest.raises(UsageError, match="already registered"):
        load_plugin(duplicate)


def test_pass_manager_model_untouched_when_nothing_applies():
    model = parse("""
    g (float[2, 3] x) => (float[2, 3] y) {
      y = Relu(x)
    }""")
    before = to_bytes(model)
    PassManager(parse_pipeline("fixpoint(fold-constants,remove-noops,eliminate-cse,eliminate-dead)")).run(
        model, PassContext())
    assert to_bytes(model) == before


# ------------------------------------------------------------------------------------------------ declared placement
def _declared(name: str, **where) -> pm.Pass:
    class Declared(pm.Pass):
        level = where.pop("level", 2)

        def run(self, model, ctx):
            return pm.PassResult(model, False, {})

    p = Declared()
    p.name = name
    for k, v in where.items():
        setattr(p, k, v)
    return p


def _names(passes) -> list[str]:
    return [p.name if not isinstance(p, pm.FixedPoint) else "[" + ",".join(_names(p.passes)) + "]" for p in passes]


def test_a_declared_pass_joins_the_rows_its_level_allows(registry):
    from onnxc.pipeline import build_pipeline

    pm.register_pass(_declared("my-after", after="fuse-rms-norm"))
    pm.register_pass(_declared("my-before", before="fuse-gqa"))
    pm.register_pass(_declared("my-stage", stage="fuse"))
    pm.register_pass(_declared("my-cleanup", stage="cleanup", level=1))
    o2 = _names(build_pipeline(pm.PassContext(level=2)))
    assert o2[o2.index("fuse-rms-norm") + 1] == "my-after"
    assert o2[o2.index("fuse-gqa") - 1] == "my-before"
    assert o2[o2.index("fuse-transposed-matmul") + 1] == "my-stage"
    cleanups = [g for g in o2 if g.startswith("[")]
    assert cleanups and all(g.endswith("eliminate-dead,my-cleanup]") for g in cleanups)
    o1 = _names(build_pipeline(pm.PassContext(level=1)))
    assert "my-after" not in o1 and "my-stage" not in o1 and any("my-cleanup" in g for g in o1)


def test_a_declared_anchor_that_is_no_pass_is_a_usage_error(registry):
    from onnxc.pipeline import build_pipeline

    pm.register_pass(_declared("my-lost", after="fuse-rms-nrom"))
    with pytest.raises(UsageError, match="runs after 'fuse-rms-nrom', which is no pass; did you mean 'fuse-rms-norm'"):
        build_pipeline(pm.PassContext(level=2))


def test_rule_pass_drops_the_constants_its_rewrites_orphan(registry):
    """A rule that replaces x * c by Neg(x) leaves c unread: the pass removes it, and leaves a constant that was
    unread before it ran to eliminate-dead."""
    import numpy as np
    from helpers import parse
    from onnxc.rules import Rule

    model = parse("""
    g (float[2] x) => (float[2] y) {
      y = Mul(x, c)
    }""", {"c": np.array([-1.0, -1.0], np.float32), "idle": np.array([3.0], np.float32)})
    rule = Rule("mul-minus-one", lambda op, x, c: op.Mul(x, c), lambda op, x, c: op.Neg(x))
    result = pm.RulePass("negate", [rule]).run(model, pm.PassContext())
    assert result.counts == {"mul-minus-one": 1}
    assert sorted(model.graph.initializers) == ["idle"]


# ------------------------------------------------------------------------------------------------ optional stages
@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("target", pm.TARGETS)
def test_pipeline_quantize_stage_runs_only_with_its_option_before_the_final_sort(level, target):
    from onnxc.pipeline import build_pipeline, pipeline_text

    plain = _names(build_pipeline(pm.PassContext(level=level, target=target)))
    quant = _names(build_pipeline(pm.PassContext(level=level, target=target, options={"quantize": "int4"})))
    assert "quantize-int4" not in plain and "quantize?" not in pipeline_text(level, target)
    assert quant[-5:] == ["fold-awq-scales", "quantize-int4", "quantize-int8", "eliminate-dead", "sort-topologically"]
    assert quant[:-5] == (plain[:-1] if plain else [])          # the rest of the row is unchanged


def test_pipeline_quantize_stage_is_appended_to_an_explicit_pipeline_that_names_none_of_it():
    from onnxc.pipeline import build_pipeline, chosen_text

    q = pm.PassContext(options={"quantize": "int4"})
    stage = "fold-awq-scales,quantize-int4,quantize-int8,eliminate-dead,sort-topologically"
    assert chosen_text(q, "fuse-rms-norm") == f"fuse-rms-norm,{stage}"
    assert chosen_text(q, "quantize-int4,sort-topologically") == "quantize-int4,sort-topologically"
    assert chosen_text(q, "quantize-int8,sort-topologically") == "quantize-int8,sort-topologically"
    assert chosen_text(q, "eliminate-dead") == f"eliminate-dead,{stage}"   # names none of the quantize passes
    assert chosen_text(q, "") == stage
    assert chosen_text(pm.PassContext(), "fuse-rms-norm") == "fuse-rms-norm"
    assert _names(build_pipeline(pm.PassContext(), "fold-constants,quantize?(quantize-int4)")) == ["fold-constants"]
    assert _names(build_pipeline(q, "fold-constants,quantize?(quantize-int4)")) == ["fold-constants", "quantize-int4"]


def test_pipeline_unknown_optional_stage_is_a_usage_error():
    from onnxc.pipeline import with_stages

    with pytest.raises(UsageError, match="unknown optional stage 'quantise'; choose one of quantize"):
        with_stages("fold-constants,quantise?(quantize-int4)")
