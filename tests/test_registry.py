"""Component registry: spec parsing, latest-version resolution, clear errors, CLI table."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from components import registry


@pytest.fixture()
def scratch_kind():
    """Register two versions of a throwaway component and remove them afterwards."""
    keys = [("testkind", "widget", 1), ("testkind", "widget", 2)]

    @registry.register("testkind/widget@1", description="first widget")
    def widget_v1(size: int = 1) -> tuple[str, int]:
        return ("v1", size)

    @registry.register("testkind/widget@2", description="second widget")
    def widget_v2(size: int = 1) -> tuple[str, int]:
        return ("v2", size)

    yield
    for key in keys:
        registry._REGISTRY.pop(key, None)


def test_parse_specs():
    assert registry.Spec.parse("skb/hrnet-w48-pascal@1") == registry.Spec("skb", "hrnet-w48-pascal", 1)
    assert registry.Spec.parse("loss/sch") == registry.Spec("loss", "sch", None)
    assert str(registry.Spec.parse("se/restormer-xattn-gdfn@3")) == "se/restormer-xattn-gdfn@3"
    for bad in ("", "skb", "SKB/x@1", "skb/x@v1", "skb/x@", "/x@1"):
        with pytest.raises(ValueError, match="invalid component spec"):
            registry.Spec.parse(bad)


def test_omitted_version_resolves_to_latest(scratch_kind):
    assert registry.create("testkind/widget", size=3) == ("v2", 3)
    assert registry.create("testkind/widget@1", size=3) == ("v1", 3)
    assert registry.resolved_spec("testkind/widget") == "testkind/widget@2"
    assert registry.available("testkind") == ["testkind/widget@1", "testkind/widget@2"]


def test_unknown_spec_lists_what_exists(scratch_kind):
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.resolve("testkind/widget@7")
    assert "testkind/widget@1" in str(err.value) and "testkind/widget@2" in str(err.value)
    with pytest.raises(registry.UnknownComponentError, match="available in the registry"):
        registry.resolve("nosuchkind/thing")


def test_registration_requires_version_and_rejects_clashes(scratch_kind):
    with pytest.raises(ValueError, match="explicit version"):
        registry.register("testkind/widget")

    def other() -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        registry.register("testkind/widget@1")(other)


def test_builtins_registered():
    kinds = {spec.split("/")[0] for spec in registry.available()}
    assert {"skb", "se", "loss", "baseline"} <= kinds


def test_cli_components_table(scratch_kind):
    from flows.cli import app

    result = CliRunner().invoke(app, ["components", "--kind", "testkind"])
    assert result.exit_code == 0, result.output
    assert "testkind/widget@2" in result.output and "second widget" in result.output
    help_result = CliRunner().invoke(app, ["components", "--help"])
    assert help_result.exit_code == 0 and "--kind" in help_result.output
