import pytest

from llm_omninode.backend.cid import CIDError, cid_of, cid_of_chunks, digest_of_cid, is_cid

EMPTY = "bafkr4ifpcne3t5pzugtkaqcn5i3nzskjtpfslsnnyejlpte2spfoihzsmi"
HELLO = "bafkr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"


def test_known_vectors():
    assert cid_of(b"") == EMPTY
    assert cid_of(b"hello") == HELLO


def test_chunks_hash_like_the_whole():
    assert cid_of_chunks([b"he", memoryview(b"ll"), b"o"]) == HELLO


def test_round_trip_and_prefix():
    import blake3

    assert digest_of_cid(HELLO) == blake3.blake3(b"hello").digest()
    assert HELLO.startswith("bafkr4i")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "bafkr4i",
        HELLO.upper(),
        "z" + HELLO[1:],
        HELLO[:-1] + "5",  # non-canonical padding bits
        HELLO[:-1] + "!",
        "b" + "a" * 58,  # right length, wrong prefix
        "../../etc/passwd",
        None,
        42,
    ],
)
def test_rejects_anything_else(bad):
    assert not is_cid(bad)
    with pytest.raises(CIDError):
        digest_of_cid(bad)
