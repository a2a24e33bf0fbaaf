"""Material for the newcomer papercut tests (issue 17, item 14), shared by their unit and system layers."""
from __future__ import annotations

from tests.support.paths import REPO

#: a manager module a test writes outside the current directory and the installed packages, so
#: that only `[[managers]] path` can make its target importable
OUTSIDE_MANAGER = '''
from pydantic import BaseModel, ConfigDict

from aios.managers.base import Manager, RequestContext, op


class HelloArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class OutsideManager(Manager):
    """A manager whose module lives outside the current directory and the installed packages."""

    service = "outside"

    @op(HelloArgs, idempotent=True)
    def hello(self, args: HelloArgs, ctx: RequestContext) -> dict:
        return {"hello": args.name, "module": __file__}
'''


def tools_readme_config() -> str:
    """The TOML block of tools/README.md, as a newcomer would copy it."""
    text = (REPO / "tools" / "README.md").read_text()
    return text.split("```toml\n", 1)[1].split("```", 1)[0]
