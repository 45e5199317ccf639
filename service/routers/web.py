"""GET /: the page (static HTML/JS/CSS, no build step, no CDN): many cutouts through
/classify/batch into a results table, sky positions through /classify/sky, one galaxy's
details (with its nearest neighbours through POST /similar when the server has an index) and
the model card.

templates/index.html is a `string.Template`: the formats it names and its file-input `accept`
list come from the format registry (galmorph.core.cutouts.formats) when the page is served, and
so do the settings the page must obey (files and bytes per batch request, whether the sky and
similar routes are on); while the server is not ready the page says why (for a missing model:
the commands that make one), with or without JavaScript; app.js then follows /readyz until the
model is there.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from galmorph.core.cutouts import formats
from galmorph.service.dependencies import RuntimeDep, SettingsDep
from galmorph.service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Outside static/: the page is only ever served filled in.
INDEX_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "index.html"

router = APIRouter(tags=["web"])


def render_index(not_ready_reason: str | None, settings: Settings) -> str:
    """The page; `not_ready_reason` is shown in its not-ready panel (None: ready, hidden)."""
    page = Template(INDEX_TEMPLATE.read_text(encoding="utf-8"))
    return page.substitute(
        formats=html.escape(formats.format_labels()),
        accept=html.escape(formats.accept_list()),
        max_batch_files=settings.max_batch_files,
        max_batch_bytes=settings.max_batch_body_bytes,
        sky_enabled="true" if settings.sky_enabled else "false",
        similar_enabled="true" if settings.similarity_index is not None else "false",
        not_ready_hidden="" if not_ready_reason is not None else "hidden",
        not_ready_reason=html.escape(not_ready_reason or ""),
    )


@router.get("/", include_in_schema=False)
async def index(runtime: RuntimeDep, settings: SettingsDep) -> HTMLResponse:
    reason = None if runtime.ready else runtime.reason or "not ready"
    return HTMLResponse(render_index(reason, settings))
