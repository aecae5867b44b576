"""The docs say what the code does: generated pages are current, documented examples parse."""

import json
import re
import sys
from pathlib import Path

from latentgraph.core.config import SystemConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_styles_page_is_generated_from_the_styles():
    sys.path.insert(0, str(DOCS))
    try:
        import gen_styles
    finally:
        sys.path.remove(str(DOCS))
    assert (DOCS / "styles.md").read_text() == gen_styles.markdown(), "run: python docs/gen_styles.py"
    for name in re.findall(r"assets/styles/(\w+)\.svg", (DOCS / "styles.md").read_text()):
        assert (DOCS / "assets" / "styles" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_format_page_example_is_a_valid_config():
    blocks = re.findall(r"```json\n(.*?)```", (DOCS / "format.md").read_text(), flags=re.DOTALL)
    config = SystemConfig.model_validate(json.loads(blocks[0]))
    assert [a.name for a in config.agents] == ["expert", "learner"]
    assert json.loads(config.to_json()) == json.loads(blocks[0])  # every key documented, none missing
    manifests = [json.loads(block) for block in blocks[1:]]
    assert "adapters" in manifests[0] and "tasks" in manifests[1]


def test_format_page_schema_lists_exactly_the_config_fields():
    from latentgraph.core.config import AgentConfig, EdgeConfig, SubsystemConfig

    page = (DOCS / "format.md").read_text()
    table = page[page.index("### Schema"):page.index("A link is")]
    listed = {name for row in re.findall(r"^\| (`[^|]+) \|", table, flags=re.MULTILINE)
              for name in re.findall(r"`([^`]+)`", row)}
    expected = ({*SystemConfig.model_fields} | {f"agents[].{f}" for f in AgentConfig.model_fields}
                | {f"edges[].{f}" for f in EdgeConfig.model_fields}
                | {f"subsystems[].{f}" for f in SubsystemConfig.model_fields})
    assert listed == expected
