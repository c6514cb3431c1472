"""Creating a consortium directory: PKI, run.toml (with the ontology and model-config hashes), app stub."""

from __future__ import annotations

from typing import Any

from server.consortium import Consortium
from server.flower_app import write_app_dir
from server.run_config import RunConfig, save_run_config
from vilref_fed.security import CertificateInfo, certificate_info, create_ca, issue_server_certificate

ALWAYS_HOSTS = ("localhost", "127.0.0.1")


class ConsortiumSetupError(RuntimeError):
    pass


def _hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for h in [*hosts, *ALWAYS_HOSTS]:
        for part in str(h).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def create_consortium(
    c: Consortium,
    hosts: list[str] | tuple[str, ...] = (),
    port: int = 9092,
    model: str = "tiny",
    rounds: int = 3,
    local_epochs: int = 1,
    local_steps: int = 0,
    strategy: str = "fedavg",
    min_sites: int = 2,
    database_url: str = "",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Create everything a coordinator needs in `c.root`; refuses an existing consortium."""
    from server.global_model import model_config_hash
    from vilref_fed.ontology import load_ontology

    if c.run_toml.exists() or c.ca_cert.exists():
        raise ConsortiumSetupError(
            f"{c.root} already holds a consortium; use another directory, or --renew-server-cert to replace "
            "only the server certificate"
        )
    try:
        mhash = model_config_hash(model)
    except (ValueError, FileNotFoundError) as err:
        raise ConsortiumSetupError(f"unknown model configuration {model!r}: {err}") from None
    cfg = RunConfig()
    cfg.run.model, cfg.run.rounds = model, rounds
    cfg.run.local_epochs, cfg.run.local_steps = local_epochs, local_steps
    cfg.run.model_config_hash = mhash
    cfg.run.ontology_hash = load_ontology().hash
    cfg.strategy.name = strategy
    cfg.sites.min_sites = min_sites
    cfg.server.port = port
    cfg.server.database_url = database_url
    for sec, values in (overrides or {}).items():
        if sec in ("train", "privacy"):
            getattr(cfg, sec).update(values)
            continue
        obj = getattr(cfg, sec)
        for k, v in values.items():
            if not hasattr(obj, k):
                raise ConsortiumSetupError(f"unknown run.toml key {sec}.{k}")
            setattr(obj, k, v)
    cfg.validate()
    sans = _hosts(hosts)
    c.make_dirs()
    save_run_config(cfg, c.run_toml)
    create_ca(c.ca_cert, c.ca_key)
    issue_server_certificate(c.ca_cert, c.ca_key, c.server_cert, c.server_key, hosts=sans)
    write_app_dir(c.app_dir)
    return {
        "sans": certificate_info(c.server_cert).sans,
        "ca_fingerprint": certificate_info(c.ca_cert).fingerprint_sha256,
        "ontology_hash": cfg.run.ontology_hash,
        "model_hash": mhash,
    }


def renew_server_certificate(c: Consortium, hosts: list[str] | tuple[str, ...] = ()) -> CertificateInfo:
    """A new server certificate from the same CA (hospitals keep their ca.crt); old SANs kept."""
    c.require()
    old = certificate_info(c.server_cert).sans if c.server_cert.exists() else ()
    issue_server_certificate(
        c.ca_cert, c.ca_key, c.server_cert, c.server_key, hosts=_hosts([*old, *hosts]), overwrite=True
    )
    return certificate_info(c.server_cert)
