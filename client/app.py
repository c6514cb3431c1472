"""The Flower ClientApp (`client.app:app`), run by each hospital's SuperNode for every message.

`site-dir` comes from the SuperNode's node config (set by `vilref-client join`). The reply carries
only the shared model parameters and scalar metrics; a refusal (SiteRefusal) travels back as the
reply's error reason and is recorded by the coordinator. Site-level DP clipping on the site, when
the run's privacy mode asks for it, is applied by `site_dp_mod`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from server import protocol
from server.protocol import SiteRefusal

app = ClientApp()


def privacy_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Site-level DP clipping on the site when the run asks for it (server/privacy.py). Imported only
    then: the DP stack (opacus) costs seconds of start-up in every ClientApp process otherwise."""
    if str(context.run_config.get("privacy.mode", "none")) in ("", "none"):
        return call_next(msg, context)
    from server.privacy import site_dp_mod

    return site_dp_mod(msg, context, call_next)


@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)

    import vilref_fed  # noqa: F401  (offline environment for transformers before the model is built)
    from client.fed_train import run_round

    site_dir = str(context.node_config.get("site-dir", ""))
    if not site_dir:
        raise SiteRefusal("this SuperNode was started without a site directory; use `vilref-client join`")
    arrays = msg.content[protocol.ARRAYS].to_torch_state_dict()
    cfg = dict(msg.content[protocol.CONFIG])
    state, metrics = run_round(Path(site_dir), arrays, cfg)
    content = RecordDict({protocol.ARRAYS: ArrayRecord(state), protocol.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
