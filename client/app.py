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


def unpack_instruction(msg: Message) -> tuple[dict, dict, protocol.ParamSpec | None]:
    """(named torch state, config, spec) of a train instruction; the weights travel packed."""
    import numpy as np
    import torch

    cfg = dict(msg.content[protocol.CONFIG])
    record = msg.content[protocol.ARRAYS]
    if protocol.PARAM_SPEC not in cfg:  # a coordinator that sends named arrays
        return record.to_torch_state_dict(), cfg, None
    spec = protocol.spec_from_json(str(cfg[protocol.PARAM_SPEC]))
    if protocol.spec_hash(spec) != cfg.get(protocol.PARAM_SPEC_HASH):
        raise SiteRefusal("the parameter layout sent by the coordinator does not match its own hash")
    try:
        named = protocol.unpack({k: a.numpy() for k, a in record.items()}, spec)
    except ValueError as err:
        raise SiteRefusal(f"the global weights do not match their layout: {err}") from None
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in named.items()}, cfg, spec


def reply(msg: Message, state: dict, metrics: dict, spec: protocol.ParamSpec | None) -> Message:
    """The train reply: the shared parameters (packed like the instruction) and scalar metrics."""
    from collections import OrderedDict

    from flwr.app import Array

    if spec is None:
        arrays = ArrayRecord(state)
    else:
        try:
            packed = protocol.pack(state, spec)
        except (KeyError, ValueError) as err:
            raise SiteRefusal(f"the trained weights do not match the consortium's layout: {err}") from None
        arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in packed.items()))
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    import vilref_fed  # noqa: F401  (offline environment for transformers before the model is built)
    from client.fed_train import run_round

    site_dir = str(context.node_config.get("site-dir", ""))
    if not site_dir:
        raise SiteRefusal("this SuperNode was started without a site directory; use `vilref-client join`")
    state, cfg, spec = unpack_instruction(msg)
    new_state, metrics = run_round(Path(site_dir), state, cfg)
    return reply(msg, new_state, metrics, spec)
