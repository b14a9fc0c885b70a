"""The KVStore gRPC servicer: decode, call the request layer (api.py), encode; and gRPC's one status table.

Every handler, unary or streaming either way, runs inside `rpc`, which resolves the caller
from the call's metadata and turns whatever it raises into a gRPC status, once, here: a
kvstore error's own status with its exact type name in trailing metadata (so the client
raises the same type), INVALID_ARGUMENT for a ValueError, a generic INTERNAL for a bug
(StoreAPI.refusal). The Admin servicer uses the same decorator. The messages themselves
are rpc_codec.py's, the same table the local control socket answers with.

The calls carrying payload skip the generated serializers (add_to_server): Put's and Write's requests
arrive as bytes and are parsed by the handler into views of the message, Get's answers leave as bytes
built from the pinned slots (kvwire/payload_codec.py), so a payload is copied once on each side.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from kvwire.defaults import MAX_MESSAGE_BYTES
from kvwire.errors import ERROR_TYPE_METADATA, InvalidRequestError, KVStoreError
from kvstore import rpc_codec as codec
from kvstore.api import StoreAPI
from kvstore.auth import Authenticator
from kvstore.store import Caller
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
RAW_REQUESTS = frozenset({"Put", "Write"})  # bytes in, parsed by the handler (payload_codec): payloads stay views
RAW_RESPONSES = frozenset({"Get"})  # bytes out, built by the handler from the slots


class Door(Protocol):
    """What `rpc` needs of a servicer."""

    api: StoreAPI
    auth: Authenticator


def abort(context: grpc.ServicerContext, err: KVStoreError) -> NoReturn:
    """gRPC's status table: the error's status, its detail, and its type name for the client to raise."""
    context.set_trailing_metadata(((ERROR_TYPE_METADATA, type(err).__name__),))
    context.abort(grpc.StatusCode[err.status], str(err))


def malformed(method: str, err: DecodeError) -> InvalidRequestError:
    return InvalidRequestError(f"the {method} request does not parse: {err}")


def rpc(method: Callable) -> Callable:
    """Wrap a servicer method `(self, request, context, caller)`, plain or a generator, as a gRPC handler."""
    name = method.__name__

    def caller_of(self: Door, context: grpc.ServicerContext) -> Caller:
        return self.auth.caller(context.invocation_metadata(), context.peer())

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: Door, request, context: grpc.ServicerContext):
            try:
                yield from method(self, request, context, caller_of(self, context))
            except grpc.RpcError:
                raise  # the call itself failed (the client went away): gRPC already knows how it ended
            except DecodeError as err:
                abort(context, self.api.refusal(name, malformed(name, err)))
            except Exception as err:
                abort(context, self.api.refusal(name, err))

        return streaming

    @functools.wraps(method)
    def unary(self: Door, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context, caller_of(self, context))
        except grpc.RpcError:
            raise  # as above: a client-streaming request iterator raises it when the client cancels
        except DecodeError as err:
            abort(context, self.api.refusal(name, malformed(name, err)))
        except Exception as err:
            abort(context, self.api.refusal(name, err))

    return unary


def _unary(name: str) -> Callable:
    call = codec.UNARY[name].call
    parse = codec.UNARY[name].parse if name in RAW_REQUESTS else None

    def handler(self: "KVStoreServicer", request, context: grpc.ServicerContext, caller: Caller):
        return call(self.api, caller, parse(request) if parse is not None else request, context.is_active)

    handler.__name__ = handler.__qualname__ = name
    return rpc(handler)


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, api: StoreAPI, auth: Authenticator) -> None:
        self.api = api
        self.auth = auth

    Lookup = _unary("Lookup")
    AcquireLeases = _unary("AcquireLeases")
    RenewLeases = _unary("RenewLeases")
    ReleaseLeases = _unary("ReleaseLeases")
    Wait = _unary("Wait")  # ends early once context.is_active() says the caller has gone
    Reserve = _unary("Reserve")
    Commit = _unary("Commit")
    Put = _unary("Put")
    Pin = _unary("Pin")
    Unpin = _unary("Unpin")
    Delete = _unary("Delete")
    Stats = _unary("Stats")
    DataPlane = _unary("DataPlane")

    @rpc
    def Write(self, request_iterator, context, caller: Caller):
        return codec.write(self.api, caller, request_iterator)

    @rpc
    def Get(self, request, context, caller: Caller):
        yield from codec.get(self.api, caller, request)


def add_to_server(servicer: KVStoreServicer, server: grpc.Server) -> None:
    """The generated add_KVStoreServicer_to_server, but for the payload calls' serializers (RAW_*)."""
    handlers = {}
    for m in codec.SERVICE.methods:
        kind = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
        handlers[m.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, m.name),
            request_deserializer=None if m.name in RAW_REQUESTS else GetMessageClass(m.input_type).FromString,
            response_serializer=None if m.name in RAW_RESPONSES else GetMessageClass(m.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(codec.SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(codec.SERVICE.full_name, handlers)
