"""The checked-in gRPC code must be what grpcio-tools generates from protos/ today."""
from splitserve import protogen


def test_generated_code_is_up_to_date():
    stale = protogen.is_stale()
    assert not stale, f"stale generated files {stale}: run `.venv/bin/python -m splitserve.protogen`"


def test_services_and_messages_exist():
    from splitserve.v1 import decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, kvstore_pb2_grpc, prefill_pb2_grpc

    assert hasattr(gateway_pb2_grpc, "GatewayStub") and hasattr(prefill_pb2_grpc, "PrefillStub")
    assert hasattr(decode_pb2_grpc, "DecodeStub") and hasattr(kvstore_pb2_grpc, "KVStoreStub")
    req = gateway_pb2.GenerateRequest(prompt="hi")
    assert req.WhichOneof("input") == "prompt"
