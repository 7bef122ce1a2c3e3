"""An HTML template for ``dvc plots show`` and ``dvc plots diff`` that renders with no network.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline its Vega plots are
blank. This template carries those libraries inline, from the installed ``vl-convert-python``
package (nothing is downloaded), and leaves out DVC's ``{scripts}`` placeholder, where the CDN
tags would go. ``make plots`` writes it and passes it as ``--html-template``::

    python -m pipeline.plots_page .dvc/tmp/plots-offline.html
    dvc plots show --html-template .dvc/tmp/plots-offline.html
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.files import atomic_write_text

log = logging.getLogger("pipeline.plots_page")

# DVC's templates are Vega-Lite 5 specs ("$schema": ".../vega-lite/v5.json").
VEGA_LITE_MAJOR = "5"
# dvc_render's page, with the scripts inline instead of its {scripts} placeholder.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- @VERSIONS@, inline: this page needs no network -->
    <script type="text/javascript">
@BUNDLE@
    </script>
    <style>
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page_template(bundle: str, versions: str) -> str:
    """DVC's page template with ``bundle`` (a script that defines ``vegaEmbed``) inline."""
    if "</script" in bundle.lower():
        raise ValueError("the Vega bundle contains '</script' and cannot be inlined in a <script> element")
    return PAGE.replace("@VERSIONS@", versions).replace("@BUNDLE@", bundle)


def vega_bundle() -> tuple[str, str]:
    """Vega, Vega-Lite (the newest 5.x the package has) and Vega-Embed as one script, and their versions."""
    import vl_convert

    vega_lite = max((v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == VEGA_LITE_MAJOR),
                    key=lambda v: tuple(int(part) for part in v.split(".")))
    versions = (f"Vega {vl_convert.get_vega_version()}, Vega-Lite {vega_lite}, "
                f"Vega-Embed {vl_convert.get_vega_embed_version()} from vl-convert-python")
    return vl_convert.javascript_bundle(vl_version=vega_lite), versions


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plots_page", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the template, e.g. .dvc/tmp/plots-offline.html")
    args = parser.parse_args()
    bundle, versions = vega_bundle()
    atomic_write_text(args.out, page_template(bundle, versions))
    log.info("wrote %s (%s)", args.out, versions)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
