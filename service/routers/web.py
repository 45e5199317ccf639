"""GET /: the drop-a-cutout page (static HTML/JS/CSS, no build step, no CDN).

templates/index.html is a `string.Template`: the formats it names and its file-input `accept`
list come from the format registry (galmorph.core.formats) when the page is served, and while
the server is not ready the page says why (for a missing model: the commands that make one),
with or without JavaScript; app.js then follows /readyz until the model is there.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from galmorph.service.dependencies import RuntimeDep

from galmorph.core import formats

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Outside static/: the page is only ever served filled in.
INDEX_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "index.html"

router = APIRouter(tags=["web"])


def render_index(not_ready_reason: str | None) -> str:
    """The page; `not_ready_reason` is shown in its not-ready panel (None: ready, hidden)."""
    page = Template(INDEX_TEMPLATE.read_text(encoding="utf-8"))
    return page.substitute(
        formats=html.escape(formats.format_labels()),
        accept=html.escape(formats.accept_list()),
        not_ready_hidden="" if not_ready_reason is not None else "hidden",
        not_ready_reason=html.escape(not_ready_reason or ""),
    )


@router.get("/", include_in_schema=False)
async def index(runtime: RuntimeDep) -> HTMLResponse:
    return HTMLResponse(render_index(None if runtime.ready else runtime.reason or "not ready"))
