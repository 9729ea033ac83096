"""A keyfront client that is not tonic: Python grpcio against `keyfront dev`.

Generates stubs from proto/ with grpcio-tools, calls Encrypt, Decrypt, GenerateDataKey,
GenerateMac and VerifyMac with the dev certificates over mutual TLS, checks a refusal, and lists
the services by reflection. Exits non-zero on any failure. Run by tests/python_client.rs.

It is the example for callers in other languages, not a package: the stubs are generated from
the proto at run time, so it always speaks the server's current contract (docs/DESIGN.md,
"Clients").
"""

import argparse
import importlib.resources
import sys
import tempfile

import grpc
from grpc_tools import protoc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="the keyfront dev directory")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--proto", required=True, help="the repository's proto/ directory")
    args = parser.parse_args()

    out = tempfile.mkdtemp()
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    status = protoc.main([
        "protoc", f"-I{args.proto}", f"-I{include}", f"--python_out={out}",
        f"--grpc_python_out={out}", "keyfront/v1/keyfront.proto", "google/rpc/status.proto",
    ])
    if status != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    sys.path.insert(0, out)
    from keyfront.v1 import keyfront_pb2 as pb
    from keyfront.v1 import keyfront_pb2_grpc as rpc

    def channel(principal: str) -> grpc.Channel:
        def read(name: str) -> bytes:
            with open(f"{args.dir}/certs/{name}", "rb") as f:
                return f.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("ca.crt"),
            private_key=read(f"{principal}.key"),
            certificate_chain=read(f"{principal}.crt"),
        )
        return grpc.secure_channel(f"localhost:{args.port}", credentials)

    app = rpc.KeyServiceStub(channel("acme-app"))
    encrypted = app.Encrypt(pb.EncryptRequest(
        key="default", plaintext=b"hello from python", context={"lang": "python"}))
    decrypted = app.Decrypt(pb.DecryptRequest(
        ciphertext=encrypted.ciphertext, context={"lang": "python"}))
    assert decrypted.plaintext == b"hello from python", decrypted
    print(f"Encrypt/Decrypt: key {encrypted.key_id} v{encrypted.key_version}, "
          f"{len(encrypted.ciphertext)}-byte ciphertext round-tripped")

    made = app.GenerateMac(pb.GenerateMacRequest(key="mac", data=b"invoice 42"))
    checked = app.VerifyMac(pb.VerifyMacRequest(
        key="mac", data=b"invoice 42", mac=made.mac, key_version=made.key_version))
    assert checked.valid, checked
    forged = app.VerifyMac(pb.VerifyMacRequest(
        key="mac", data=b"invoice 43", mac=made.mac, key_version=made.key_version))
    assert not forged.valid, forged
    print(f"GenerateMac/VerifyMac: {len(made.mac)}-byte MAC of v{made.key_version} verified")

    backup = rpc.KeyServiceStub(channel("acme-backup"))
    data_key = backup.GenerateDataKey(pb.GenerateDataKeyRequest(key="default", include_plaintext=True))
    assert len(data_key.plaintext_key) == 32, data_key
    print(f"GenerateDataKey: 32-byte key, {len(data_key.wrapped_key)}-byte wrapped key")

    try:
        app.GenerateDataKey(pb.GenerateDataKeyRequest(key="default"))
        print("an app principal was allowed GenerateDataKey", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        print(f"GenerateDataKey as acme-app: {error.code().name}")

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    services = sorted(ProtoReflectionDescriptorDatabase(channel("officer")).get_services())
    print("services:", ", ".join(services))
    for wanted in ("keyfront.v1.KeyService", "keyfront.v1.AdminService", "grpc.health.v1.Health"):
        assert wanted in services, services
    print("python client OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
