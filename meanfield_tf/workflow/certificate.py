"""`meanfield-tf ntk`: the sequences of an injectivity certificate, and its JSON report.

Sequences come from empirical tokens (`.npz`) or from an `NTKConfig` listing analytic families or
sets of atoms; with `num_tokens` every continuous family is replaced by that many sampled tokens.
The report holds, per test (`mod_affine`, `mod_constants`, `hessian`, `ntk`), `ratio`,
`independent`, `threshold` and `null_vector` (one coefficient per sequence), see `docs/ntk.md`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, InputError
from .._injectivity import Certificate, injectivity_certificate
from .._tokens import Discrete, families_from_tokens
from . import build
from .config import NTKConfig, expand_copies, from_dict, read_yaml
from .files import load_tokens

TESTS = ("mod_affine", "mod_constants", "hessian", "ntk")


def resolve(*, tokens_path=None, config_path=None, options: dict | None = None
            ) -> tuple[NTKConfig, list, list[str]]:
    """`(config, families, names)` of the command line's inputs; `options` (seed, num_samples,
    z_scale, num_heads; `None` = not given) are laid over the config."""
    dtype = build.dtype("float64")  # the certificate is a rounding-level test
    if config_path is not None:
        cfg = from_dict(NTKConfig, read_yaml(config_path))
        if not cfg.sequences:
            raise ConfigError(f"{config_path}: sequences must list at least one sequence "
                              f"(e.g. - {{family: gaussian, mean: [0, 0], cov: [[1, 0], [0, 1]]}})")
    else:
        cfg = NTKConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (options or {}).items() if v is not None})
    if tokens_path is not None:
        fams = families_from_tokens(load_tokens(tokens_path, dtype))
        return cfg, fams, [f"tokens[{i}]" for i in range(len(fams))]
    fams = build.families(cfg.sequences, dtype, "sequences")
    names = [f"sequences[{i}] ({spec['family']})" for i, spec in expand_copies(cfg.sequences)]
    if cfg.num_tokens is not None:
        fams = empirical(fams, cfg.num_tokens, cfg.seed)
    return cfg, fams, names


def empirical(families, num_tokens: int, seed: int) -> list:
    """Replace continuous families by `num_tokens` samples (`Discrete` sequences are kept)."""
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(families))
    out = []
    for f, k in zip(families, keys):
        out.append(f if isinstance(f, Discrete) else Discrete(*f.tokens(k, num_tokens)))
    return out


MAX_SCORE = 1e4  # |z . y| beyond this: the LSE columns are all slope, the tests meaningless


def check_scale(cfg: NTKConfig, families) -> None:
    """Refuse sequences whose scores `z . y` at the sampled `z` reach `MAX_SCORE`: there every LSE
    is its affine part to rounding, and the verdicts would contradict each other."""
    atoms = [np.asarray(f.atoms) for f in families if isinstance(f, Discrete)]
    spread = max((float(np.abs(a).max()) for a in atoms if a.size), default=0.0)
    dim = families[0].dim if families else 1
    score = cfg.z_scale * spread * 3 * np.sqrt(dim)  # 3 standard deviations of z
    if not np.isfinite(score) or score > MAX_SCORE:
        raise InputError(f"token coordinates reach {spread:.3g}, so the scores z . y reach "
                         f"{score:.3g} at z_scale={cfg.z_scale:g}: the certificate would be "
                         f"meaningless; rescale the tokens or set --z-scale to about "
                         f"{1 / max(spread, 1e-300):.3g} (1 / their spread)")


def certify(cfg: NTKConfig, families, *, config_path=None) -> Certificate:
    """The injectivity certificate of `families` with the settings of `cfg` (bad settings from a
    config file are reported as `ConfigError`s naming it)."""
    check_scale(cfg, families)
    query = None if cfg.query is None else jnp.asarray(cfg.query, jnp.float64)
    try:
        return injectivity_certificate(
            families, key=jax.random.PRNGKey(cfg.seed), num_samples=cfg.num_samples,
            z_scale=cfg.z_scale, num_heads=cfg.num_heads, query=query, safety=cfg.safety,
        )
    except InputError as err:
        if config_path is not None:
            raise ConfigError(f"{config_path}: {err}") from None
        raise


def report(cert: Certificate, names, cfg: NTKConfig) -> dict:
    """The JSON-serialisable report of a `Certificate`."""
    out = {name: cert.tests[name].to_dict() for name in TESTS}
    scale = cert.ntk.num_heads  # L = 1: the traced Gram is L*M*sigma^2
    sv = np.asarray(cert.ntk.blocks["A"].singular_values)
    out["ntk"].update(
        source=cert.ntk.source,
        block="A",
        gram_lambda_max=float(scale * sv[0] ** 2),
        gram_lambda_min=float(scale * sv[-1] ** 2),
        blocks={k: v.to_dict() for k, v in cert.ntk.blocks.items()},
    )
    out["agree"] = bool(cert.agree)
    out["sequences"] = list(names)
    out["settings"] = {
        "seed": cfg.seed, "num_samples": cert.num_samples, "z_scale": cert.z_scale,
        "num_heads": cert.ntk.num_heads, "safety": cfg.safety, "num_tokens": cfg.num_tokens,
        "moduli": {"mod_affine": "affine", "hessian": "affine", "ntk": "affine (query-key block)",
                   "mod_constants": "constants", "ntk.blocks.V": "constants",
                   "ntk.blocks.full": "constants"},
    }
    return out


def dependence(report: dict, test: str, tol: float = 1e-3) -> str | None:
    """The dependence a test found, as words: `0.707·a - 0.707·b` over the sequences whose
    null-vector coefficient exceeds `tol` times the largest (`None` if the test is
    independent)."""
    entry = report[test]
    if entry["independent"] or entry.get("null_vector") is None:
        return None
    gamma = np.asarray(entry["null_vector"], float)
    big = np.abs(gamma) > tol * np.abs(gamma).max()
    terms = [f"{'-' if g < 0 else '+'} {abs(g):.3g}·{name}"
             for g, name, keep in zip(gamma, report["sequences"], big) if keep]
    return " ".join(terms).lstrip("+ ")
