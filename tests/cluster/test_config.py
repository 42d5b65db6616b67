import json
from pathlib import Path

import pytest

from shared.config import ConfigError, StrictConfig, deep_merge, dump_yaml, load_config, parse_overrides
from cluster.cli.config_index import CONFIG_DIR, CONFIG_SCHEMAS, schema_for


class Inner(StrictConfig):
    n: int = 1
    tags: list[str] = []


class Outer(StrictConfig):
    name: str = "x"
    inner: Inner = Inner()


def test_parse_overrides_types_and_nesting():
    got = parse_overrides(["a.b=3", "a.c=true", "d=[x, y]", "e=null", "f=hello world", "g="])
    assert got == {"a": {"b": 3, "c": True}, "d": ["x", "y"], "e": None, "f": "hello world", "g": ""}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a=[unclosed"])
def test_parse_overrides_rejects_malformed(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_load_config_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\ninner: {n: 5}\n")
    cfg = load_config(Outer, path, ["inner.tags=[a]"])
    assert (cfg.name, cfg.inner.n, cfg.inner.tags) == ("fromfile", 5, ["a"])
    assert load_config(Outer, None, []) == Outer()


def test_unknown_key_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="typo"):
        load_config(Outer, None, ["inner.typo=1"])
    path = tmp_path / "c.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path: Path):
    cfg = Outer(name="r", inner=Inner(n=2, tags=["t"]))
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg


def test_every_shipped_yaml_is_indexed_and_valid():
    shipped = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    assert shipped, "no configs shipped"
    unindexed = [name for name in shipped if name not in CONFIG_SCHEMAS]
    assert not unindexed, f"add these to cluster/cli/config_index.py: {unindexed}"
    for name in shipped:
        load_config(schema_for(name), CONFIG_DIR / name)


def test_pipeline_ref_keeps_the_settings_of_the_stage_by_stage_configs():
    """configs/pipeline-ref.yaml repeats capture-ref, probe, tune, fit and evaluate.yaml
    (minus the paths the pipeline wires): an edit to one of them must reach the other."""
    ref = load_config(schema_for("pipeline-ref.yaml"), CONFIG_DIR / "pipeline-ref.yaml", [])
    paths = {"queries", "out", "activations", "labels", "targets", "artifact", "probe_report", "registry",
             "ray_address", "progress"}
    pairs = {"capture-ref.yaml": ref.capture, "probe.yaml": ref.probe, "tune.yaml": ref.tune,
             "evaluate.yaml": ref.evaluate}
    for name, section in pairs.items():
        alone = load_config(schema_for(name), CONFIG_DIR / name, [])
        assert alone.model_dump(exclude=paths) == section.model_dump(exclude=paths), name
    fit = load_config(schema_for("fit.yaml"), CONFIG_DIR / "fit.yaml", [])
    best = json.loads((CONFIG_DIR.parent / "data" / "tune" / "tune.json").read_text())["best"]
    assert (fit.blocks, fit.n_components) == (best["blocks"], best["n_components"])  # pipeline-ref: from tune
    skip = {"storage_path"}
    assert fit.train.model_dump(exclude=skip) == ref.fit.train.model_dump(exclude=skip)
    assert fit.tolerance == ref.fit.tolerance


def test_the_heads_free_ports_are_distinct_and_given_ones_checked():
    """Ports left at 0 are picked together, so no two components get one port (picked one at a
    time, the dashboard once drew the GCS's port and `ray start` failed); a configured port is
    kept, never re-picked, and two equal ones are refused."""
    import socket

    from cluster.local import ClusterError, LocalClusterConfig, _ports, free_ports

    for _ in range(20):
        picked = free_ports(4)
        assert len(set(picked)) == 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        kept = s.getsockname()[1]
    ports = _ports(LocalClusterConfig(port=kept, dashboard_port=0))
    assert ports["port"] == kept and len(set(ports.values())) == 4
    with pytest.raises(ClusterError, match="two of the head's ports are the same"):
        _ports(LocalClusterConfig(port=kept, dashboard_port=kept))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(ClusterError, match="already in use"):
            _ports(LocalClusterConfig(port=s.getsockname()[1], dashboard_port=0))


def test_the_from_logs_pipeline_judges_first_and_only_a_log_it_imports(tmp_path):
    from cluster.pipeline.config import PipelineConfig
    from cluster.pipeline.run import STAGES

    base = [f"work_dir={tmp_path}", f"data_import.inputs=[{tmp_path / 'log'}]"]
    cfg = load_config(PipelineConfig, CONFIG_DIR / "pipeline-from-logs.yaml",
                      [*base, f"judge={{log: {tmp_path / 'log'}, judge: smollm2-135m}}"])
    assert [s.name for s in STAGES if s.when(cfg)][:2] == ["judge", "data"]
    assert cfg.judge.registry == cfg.registry and cfg.judge.ray_address == cfg.ray_address  # wired
    with pytest.raises(ConfigError, match="not among data_import.inputs"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-from-logs.yaml",
                    [*base, f"judge={{log: {tmp_path / 'other'}, judge: smollm2-135m}}"])
    plain = load_config(PipelineConfig, CONFIG_DIR / "pipeline-from-logs.yaml", base)
    assert "judge" not in [s.name for s in STAGES if s.when(plain)]


def test_the_adapt_stage_is_wired_and_refused_without_tune_or_the_token_states_it_reads(tmp_path):
    from cluster.pipeline.config import PipelineConfig
    from cluster.pipeline.run import STAGES

    base = [f"work_dir={tmp_path}", "capture.token_layers=[12]", "capture.token_window=128"]
    cfg = load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*base, "adapt={from_layer: 12}"])
    assert [s.name for s in STAGES if s.when(cfg)][-4:] == ["fit", "adapt", "evaluate", "publish"]
    assert cfg.adapt.tune_report == str(tmp_path / "tune" / "tune.json") and cfg.adapt.targets == cfg.targets
    assert cfg.adapt.out == str(tmp_path / "router-adapted") and cfg.adapt.activations == cfg.capture.out
    # the adapted artifact routes with fit's tolerance unless the adapt section sets its own
    rb = load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml", [f"work_dir={tmp_path}"])
    assert rb.fit.tolerance == 0.05 and rb.adapt.tolerance == 0.05
    own = load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml",
                      [f"work_dir={tmp_path}", "fit.tolerance=0.1", "adapt.tolerance=0.3"])
    assert own.fit.tolerance == 0.1 and own.adapt.tolerance == 0.3
    with pytest.raises(ConfigError, match="add a `tune` section"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*base, "adapt={from_layer: 12}", "tune=null"])
    with pytest.raises(ConfigError, match="capture.token_layers to include 9"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*base, "adapt={from_layer: 9}"])
    with pytest.raises(ConfigError, match="exceeds capture.token_window=128"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*base, "adapt={from_layer: 12, window: 256}"])
    with pytest.raises(ConfigError, match="set by the pipeline"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*base, "adapt={from_layer: 12, out: x}"])


def test_blocks_named_outright_must_be_captured_before_anything_runs(tmp_path):
    """An encoder override whose layers leave out a tune candidate's block (or an attn block's token layer, or
    adapt's frozen block) is refused by `pipeline check`, not after the capture."""
    from cluster.pipeline.config import PipelineConfig

    gemma = [f"work_dir={tmp_path}", "capture.encoder=gemma3-270m", "capture.layers=[2,4,6,8,10,12,14,16,18]"]
    with pytest.raises(ConfigError, match=r"\['h21_last'\] .* would not be captured"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml", gemma)
    with pytest.raises(ConfigError, match=r"\['h21_attn'\] .* would not be captured"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml",
                    [f"work_dir={tmp_path}", "capture.token_layers=[]", "adapt=null"])
    with pytest.raises(ConfigError, match=r"\['h18_last'\] .* would not be captured"):
        load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml",
                    [f"work_dir={tmp_path}", "capture.layers=[21]", "tune.candidates=[{blocks: probe, n_components: 8}]"])
    documented = load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerbench.yaml", [
        *gemma, "capture.token_layers=[]", "adapt=null",
        "tune.candidates=[{blocks: probe, n_components: 64}, {blocks: [minilm], n_components: 8}]"])
    assert documented.adapt is None and documented.capture.token_layers == []
    assert load_config(PipelineConfig, CONFIG_DIR / "pipeline-routerdc.yaml", [*gemma, "adapt=null"]).adapt is None
