"""Every shipped recipe loads into a valid configuration whose settings match its name."""

import re
from pathlib import Path

import pytest

from frugal_qat.config import load_recipe, resolve

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert "demo" in names and {"smollm2_135m_w2g64", "smollm2_135m_w3g64", "smollm2_135m_w4g64"} <= names
    assert len([n for n in names if n.startswith(("llama2_", "llama3_"))]) == 20


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_resolves_and_matches_its_name(path):
    cfg = resolve(load_recipe(path), {})  # unknown keys or bad values raise ConfigError
    m = re.search(r"_w(\d)g(\d+)$", path.stem)
    if m:
        assert (cfg.quant.wbits, cfg.quant.group_size) == (int(m[1]), int(m[2]))
    if path.stem.startswith(("llama", "smollm2", "demo")):
        assert "e2e_qp" in load_recipe(path), "a model recipe carries its E2E-QP step too"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_commands_in_recipe_comments_name_known_models(path):
    """A recipe's comment that says `frugal-qat plan --model NAME` must name a config `plan` knows."""
    from frugal_qat.planner import list_known_models

    for name in re.findall(r"plan --model (\S+)", path.read_text()):
        assert name in list_known_models(), f"{path.name} tells users `plan --model {name}`, which plan does not know"
