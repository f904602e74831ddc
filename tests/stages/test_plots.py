import matplotlib.pyplot as plt
import pandas as pd

from refusalscope.stages.plots import layer_counts, plot_stages


def test_layer_counts_parse_feature_names():
    counts = layer_counts(pd.Series([["L3/10", "L3/11", "L17/1204"], ["L17/5"], []]))
    assert counts == {3: 2, 17: 2}


def test_plot_shows_jailbreaks_per_tau_and_layers():
    s1 = pd.DataFrame({"jailbroken": [True, True], "features": [["L3/1", "L4/2"], ["L4/3"]]})
    s2 = pd.DataFrame({"id": [0, 0, 1, 1], "tau": [0.1, 0.2, 0.1, 0.2], "size": [4, 1, 3, 0],
                       "jailbroken": [True, False, True, False],
                       "features": [["L4/2", "L9/1"], ["L9/1"], ["L9/1"], []]})
    fig = plot_stages(s1, s2, 0.1, 0, 2)
    bars = fig.axes[0].patches
    assert [b.get_height() for b in bars] == [2, 0]
    by_layer = {round(b.get_x() + b.get_width() / 2): b.get_height() for b in fig.axes[1].patches}
    assert by_layer == {4: 1, 9: 2}
    plt.close(fig)
