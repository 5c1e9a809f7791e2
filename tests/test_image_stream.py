"""VQ-GAN image streams: image i depends only on (seed, i); bad files are replaced, never fatal."""
import numpy as np
import pytest
from mimic_fixture import write_corpus

from llmcxr_jax.data import image_stream


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mimic") / "root")


def test_corpus_paths_split_train_from_held_out(corpus):
    train, held = image_stream.corpus_image_paths(str(corpus))
    assert train and held and not set(train) & set(held)
    assert all("/files/p" in p for p in train + held)


def test_file_stream_is_a_function_of_seed_and_index(corpus):
    train, held = image_stream.corpus_image_paths(str(corpus))
    a = image_stream.FileStream(train, held, seed=3, size=16, channels=1)
    b = image_stream.FileStream(train, held, seed=3, size=16, channels=1)
    n = len(train)
    whole = a.images(range(0, 2 * n + 3))  # crosses two epoch boundaries
    np.testing.assert_array_equal(b.images(range(n - 2, n + 5)), whole[n - 2:n + 5])  # "resumed" mid-run
    # every readable image appears in every epoch (a bad file's slot repeats a readable one)
    readable = set()
    for p in train:
        try:
            readable.add(image_stream.image_io.load_image(p, 16, 1).tobytes())
        except image_stream.image_io.ImageError:
            pass
    assert 0 < len(readable) < n  # the fixture holds a corrupt JPEG
    for epoch in range(2):
        assert {img.tobytes() for img in whole[epoch * n:(epoch + 1) * n]} == readable
    assert not np.array_equal(whole[:n], whole[n:2 * n])  # a fresh order per epoch
    other = image_stream.FileStream(train, held, seed=4, size=16, channels=1).images(range(n))
    assert not np.array_equal(other, whole[:n])


def test_unreadable_file_is_replaced_and_reported(corpus, tmp_path, capsys):
    train, held = image_stream.corpus_image_paths(str(corpus))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    s = image_stream.FileStream([str(bad)] + train, held, seed=0, size=16, channels=1)
    out = s.images(range(len(train) + 1))
    assert out.shape == (len(train) + 1, 16, 16, 1) and np.isfinite(out).all()
    assert str(bad) in s.bad and "broken.jpg" in capsys.readouterr().err
    with pytest.raises(ValueError, match="every training image is unreadable"):
        image_stream.FileStream([str(bad)], held, seed=0, size=16, channels=1).images([0])


def test_held_out_needs_enough_images(corpus):
    train, held = image_stream.corpus_image_paths(str(corpus))
    s = image_stream.FileStream(train, held, seed=0, size=16, channels=3)
    assert s.held_out(2).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="held-out"):
        s.held_out(len(held) + 1)
