"""Signed artifacts (OpenSSF model-signing, elliptic-curve keys, offline): a signed artifact verifies;
a changed byte anywhere, a missing signature or another key's signature is refused, naming why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from exporter.cli import main
from runtime import Session, UserError
from runtime.manifest import Manifest


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def signed(built, tmp_path, capsys) -> tuple[Path, Path, Path]:
    """Two artifacts in one folder, qa signed: (qa's manifest, the public key, the other key's public key)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    for head in ("qa", "nsp"):
        manifest = built[head][0]
        for name in [manifest.name, *Manifest.load(manifest).files]:
            shutil.copy(manifest.parent / name, folder / name)
    private, public = key_pair(tmp_path, "ours")
    _, other = key_pair(tmp_path, "theirs")
    assert main(["sign", str(folder / "qa.json"), "--key", str(private)]) == 0
    assert (folder / "qa.sig").is_file() and "signed" in capsys.readouterr().out
    return folder / "qa.json", public, other


def test_a_signed_artifact_verifies_and_opens(signed, capsys):
    manifest, public, _ = signed
    assert main(["verify", str(manifest), "--public-key", str(public)]) == 0
    assert Session(manifest, public_key=public).answer("Who?", "Ada wrote it.")["answer"] is not None


@pytest.mark.parametrize("victim", ["qa.onnx", "qa.tokenizer.json", "qa.json"])
def test_one_changed_byte_anywhere_fails_naming_the_file(signed, capsys, victim):
    manifest, public, _ = signed
    path = manifest.parent / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"signature check failed.*{victim}"):
        Session(manifest, public_key=public)
    assert main(["verify", str(manifest), "--public-key", str(public)]) == 1
    assert victim in capsys.readouterr().out


def test_unsigned_resigned_or_swapped_signatures_are_refused(signed, tmp_path, capsys):
    manifest, public, other = signed
    with pytest.raises(UserError, match="signature check failed"):
        Session(manifest, public_key=other)  # signed, but not by the key we trust
    with pytest.raises(UserError, match="not signed"):
        Session(manifest.with_name("nsp.json"), public_key=public)
    # qa's signature put beside nsp: it signs other files, so it does not vouch for nsp's.
    shutil.copy(manifest.with_name("qa.sig"), manifest.with_name("nsp.sig"))
    with pytest.raises(UserError, match="signature check failed"):
        Session(manifest.with_name("nsp.json"), public_key=public)
    # Re-signed by someone else's key after a change: refused where our key is required.
    theirs, _ = key_pair(tmp_path, "attacker")
    assert main(["sign", str(manifest), "--key", str(theirs)]) == 0
    with pytest.raises(UserError, match="signature check failed"):
        Session(manifest, public_key=public)
    assert Session(manifest).answer("Who?", "Ada wrote it.") is not None  # no key asked for: no signature needed


def test_sign_refuses_a_bad_key_or_a_tampered_artifact(signed, tmp_path, capsys):
    manifest, _, _ = signed
    (tmp_path / "garbage.key").write_text("not a key")
    assert main(["sign", str(manifest), "--key", str(tmp_path / "garbage.key")]) == 2
    assert "not a usable elliptic-curve private key" in capsys.readouterr().err
    private, _ = key_pair(tmp_path, "fresh")
    (manifest.parent / "qa.onnx").write_bytes(b"tampered")
    assert main(["sign", str(manifest), "--key", str(private)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_a_graph_swapped_in_while_signed_sessions_open_never_runs(signed):
    """Another graph renamed over qa.onnx and back, again and again, while 200 signed sessions open: each
    session that opens runs the signed graph (what runs is the bytes that were checked); the rest are
    refused, never opened on the other graph."""
    import os
    import threading

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from test_runtime_session import qa_inputs

    manifest, public, _ = signed
    folder = manifest.parent
    signed_output = Session(manifest, public_key=public).run(qa_inputs())["start_logits"]
    os.link(folder / "qa.onnx", folder / "good.onnx")
    other = onnx.load(folder / "qa.onnx")
    for tensor in other.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(other, folder / "other.onnx")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            for source in ("other.onnx", "good.onnx"):
                os.link(folder / source, folder / "swap.onnx")
                os.replace(folder / "swap.onnx", folder / "qa.onnx")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    opened = refused = 0
    try:
        for _ in range(200):
            try:
                session = Session(manifest, public_key=public, backend="onnxruntime")
            except UserError:
                refused += 1
                continue
            opened += 1
            assert np.array_equal(session.run(qa_inputs())["start_logits"], signed_output), "ran an unsigned graph"
    finally:
        stop.set()
        swapper.join()
    assert opened >= 10 and refused >= 10, (opened, refused)


def test_verify_of_a_folder_checks_the_signatures_of_published_artifacts(built, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(built["qa"][0].parent, out, symlinks=True)  # published: names link into version folders
    private, public = key_pair(tmp_path, "ours")
    assert main(["sign", str(out / "qa.json"), "--key", str(private)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--public-key", str(public)]) == 1
    text = capsys.readouterr().out
    assert f"ok   {out / 'qa.json'}" in text, text
    assert f"FAIL {out / 'nsp.json'}" in text and "not signed" in text
