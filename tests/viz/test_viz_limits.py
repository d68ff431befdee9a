"""Issue 13: the viz table of a deep model is cut with a note; an output path that is a file
is a clear error."""
import pytest

import composer
from composer import viz
from composer.core.errors import HycompError


def test_long_table_is_cut_with_a_note():
    g = composer.layer_graph(composer.load_recipe("config", ["model.n_layers=100"]))
    text = viz.table(g, 64, max_rows=30)
    assert "173 nodes not shown" in text and "203 nodes" in text
    assert len(text.splitlines()) == 30 + 5
    assert len(viz.table(g, 64).splitlines()) == 203 + 4


def test_draw_into_a_file_is_a_clear_error(tmp_path):
    g = composer.layer_graph(composer.load_recipe("config"))
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(HycompError) as ei:
        viz.draw(g, f, 64, formats=("mmd",))
    assert "not a folder" in ei.value.render()
    with pytest.raises(HycompError):
        viz.draw(g, f / "sub", 64, formats=("mmd",))
