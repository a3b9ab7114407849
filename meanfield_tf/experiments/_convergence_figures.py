"""The figures of the `convergence` experiment: log R against training time with the predicted
slope, the distance W2,c travelled against its bound, and lambda_min(K) along the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._teacher import figure, save


def figures(per_seed: list[dict], results: dict, out: Path) -> None:
    colors = [f"C{i}" for i in range(len(results["runs"]))]
    fig, ax = figure()
    for i, row in enumerate(results["runs"]):
        for j, p in enumerate(per_seed):
            r = p["runs"][i]
            t, loss = np.asarray(r["curve"]["t"]), np.asarray(r["curve"]["loss"])
            ax.plot(t, loss / loss[0], color=colors[i], lw=1,
                    label=f"ε = {row['epsilon']:g}" if j == 0 else None)
            if i == 0:
                # predicted asymptotic slope, anchored at the end of the smallest-ε curve
                ts = t[len(t) // 3:]
                ax.plot(ts, loss[-1] / loss[0] * np.exp(r["predicted_slope"] * (ts - t[-1])),
                        "k--", lw=0.8, label="slope −2λ_min(K)/N" if j == 0 else None)
    for j, p in enumerate(per_seed):
        c = p["control"]
        t, loss = np.asarray(c["curve"]["t"]), np.asarray(c["curve"]["loss"])
        ax.plot(t, loss / loss[0], color="0.4", ls="-.", lw=1,
                label="control (convolution triple)" if j == 0 else None)
        tr = c["trace"]
        ax.plot([x["t"] for x in tr], [x["kernel_residual"] / loss[0] for x in tr], "x",
                color="0.4", ms=4, label="control: part in ker K" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training time t")
    ax.set_ylabel(r"$R_t / R_0$")
    st = results["settings"]
    ax.set_title(f"Global convergence from small loss (L={st['num_layers']}, "
                 f"M={st['num_heads']}), one line per seed", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out, "convergence_loss")

    fig, ax = figure()
    for i, row in enumerate(results["runs"]):
        for j, p in enumerate(per_seed):
            sn = p["runs"][i]["snapshots"]  # t = 0 (distance 0) left out of the log scale
            ax.plot(sn["t"][1:], sn["w2c"][1:], "o-", color=colors[i], ms=3, lw=1,
                    label=f"ε = {row['epsilon']:g}" if j == 0 else None)
            ax.axhline(p["runs"][i]["w2c_bound"], color=colors[i], ls="--", lw=0.8,
                       label=r"bound $\sqrt{2NR_0/\lambda_0}$" if (j == 0 and i == 0) else None)
    ax.set_yscale("log")
    ax.set_xlabel("training time t")
    ax.set_ylabel(r"$W_{2,c}(\nu_t, \nu_0)$")
    ax.set_title("Heads stay close: distance travelled against its bound", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out, "convergence_w2c")

    fig, ax = figure()
    for i, row in enumerate(results["runs"]):
        for j, p in enumerate(per_seed):
            sn = p["runs"][i]["snapshots"]
            ax.plot(sn["t"], sn["lambda_min"], "o-", color=colors[i], ms=3, lw=1,
                    label=f"ε = {row['epsilon']:g}" if j == 0 else None)
    for j, p in enumerate(per_seed):
        tr = p["control"]["trace"]
        ax.plot([x["t"] for x in tr], np.maximum([x["lambda_min"] for x in tr], 1e-18), "x-",
                color="0.4", ms=4, lw=0.8, label="control" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training time t")
    ax.set_ylabel(r"$\lambda_{\min}(K_{\nu_t})$ (0 drawn at 1e-18)")
    ax.set_title("Smallest NTK eigenvalue along the run", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out, "convergence_lambda_min")
