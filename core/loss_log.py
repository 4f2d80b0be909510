"""The loss log of a training run: the per-epoch CSV (read back on resume, also after a spreadsheet has
re-saved it) and its curve, both written atomically."""
import csv
import io
import math
import os

from core import losses
from core.errors import UserError
from core.atomic import atomic_write
from core.png import PNG_MARK

CSV_COLUMNS = ["Epoch", "Loss", "Val_MSE", "Val_PSNR", "Val_SSIM", "Learning_Rate", "Images_Seen", "Seconds"]
_FORMATS = {"Loss": "{:.6f}", "Val_MSE": "{:.6f}", "Val_PSNR": "{:.6f}", "Val_SSIM": "{:.6f}",
            "Learning_Rate": "{:.4g}", "Images_Seen": "{:.0f}", "Seconds": "{:.1f}"}


def _number(text, decimal_comma):
    """A cell as a finite float, or None for an empty, 'n/a' or otherwise non-numeric cell."""
    text = (text or "").strip()
    if decimal_comma:
        text = text.replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_history(csv_path, up_to_epoch):
    """Rows of an earlier run's loss log for epochs 1..up_to_epoch, as this run writes them. A spreadsheet's
    round trip is fine: byte-order mark, ';' or tab separator, decimal commas, '1.0' for 1, 'n/a' (read as
    empty). A file it cannot read is a UserError, raised before anything is written."""
    if not os.path.isfile(csv_path):
        return []
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the loss log {csv_path!r} ({getattr(err, 'strerror', None) or err}): "
                        "fix it, or move it away to start its history anew; nothing was changed")
    delimiter = max((",", ";", "\t"), key=text.split("\n", 1)[0].count)
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        columns, raws = [name.strip() for name in reader.fieldnames or []], list(reader)
    except csv.Error as err:
        raise UserError(f"cannot read the loss log {csv_path!r} ({err}): fix it, or move it away to start its "
                        "history anew; nothing was changed")
    if text.strip() and not {"Epoch", "Loss"} <= set(columns):
        raise UserError(f"the loss log {csv_path!r} has no Epoch and Loss columns: fix its first line, or move it "
                        "away to start its history anew; nothing was changed")
    rows = {}
    for raw in raws:
        cells = {(key or "").strip(): value if isinstance(value, str) else "" for key, value in raw.items()}
        epoch = _number(cells.get("Epoch"), False)
        if epoch is None or epoch != int(epoch) or not 1 <= epoch <= up_to_epoch:
            continue  # a blank line, a note, or an epoch this resume has not reached
        row = {"Epoch": int(epoch)}
        for column in CSV_COLUMNS[1:]:
            value = _number(cells.get(column), delimiter == ";")
            row[column] = "" if value is None else _FORMATS[column].format(value)
        rows[int(epoch)] = row
    return [rows[epoch] for epoch in sorted(rows)]


def write_history(csv_path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(csv_path, write)


def write_log(run, plot):
    """Write run's loss log, and its curve if plot; returns the UserError of a failed write (a full disk)
    instead of raising it."""
    try:
        write_history(run.paths.log, run.history)
        if plot:
            plot_history(run.paths.plot, run.history, run.loss_name, run.cfg.l1_loss_weight)
    except UserError as err:
        return err
    except OSError as err:
        return UserError(f"cannot write {err.filename or run.paths.log!r} ({err.strerror}): free some space or fix "
                         "the folder, then run the same command again to resume")
    return None


def plot_history(png_path, rows, loss_name, l1_weight=0.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = [(int(r["Epoch"]), float(r["Loss"])) for r in rows if r.get("Loss") not in (None, "")]
    ax.plot([e for e, _ in trained], [v for _, v in trained], marker="o", markersize=3, label="training")
    loss = losses.get(loss_name)
    key = loss.log_column
    validated = [(int(r["Epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    if validated:
        values = [loss.val_loss(v) for _, v in validated]
        ax.plot([e for e, _ in validated], values, marker="s", markersize=3, label="validation")
        ax.legend()
    ax.set_xlabel("Epoch")
    ax.set_ylabel(loss.plot_label + (f" (training: + {l1_weight:g} x L1)" if l1_weight else ""))
    ax.set_title(f"Training loss ({loss.tag})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata=PNG_MARK)
    plt.close(fig)

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
    atomic_write(png_path, write)
