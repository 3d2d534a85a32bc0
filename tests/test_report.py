"""The run report's plots (fibec/report.py)."""
from matplotlib.axes import Axes

from fibec.report import plot


def test_a_personal_curve_is_drawn_only_where_it_differs_from_the_global_one(tmp_path, monkeypatch):
    """With personal_eval_every > 1 some evaluated rounds have no personalised figure; a method
    without personal layers still gets one curve, and a method with them gets its personal points."""
    def rounds(personal):
        return [{"round": n, "cum_uploaded_bytes": 1000 * n, "global_accuracy": 0.5 + 0.1 * n,
                 **({} if p is None else {"personal_accuracy": p})} for n, p in enumerate(personal, start=1)]

    drawn = []
    monkeypatch.setattr(Axes, "plot", lambda self, xs, ys, *args, label=None, **kwargs: drawn.append((label, ys)))
    plot({"fedavg": rounds([None, 0.7, 0.8]), "fibecfed": rounds([None, 0.9, 0.95])}, tmp_path)
    assert drawn == [("fedavg (global)", (0.6, 0.7, 0.8)), ("fibecfed (global)", (0.6, 0.7, 0.8)),
                     ("fibecfed (personal)", (0.9, 0.95))] * 2  # accuracy against round, then against bytes
