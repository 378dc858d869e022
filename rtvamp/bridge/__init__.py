"""The DAW bridge: a versioned wire protocol (bridge/PROTOCOL.md), the engine-side driver
(`rtvamp.bridge.server`, `rtvamp serve`) and the Python client below."""

from .client import AudioStream, BridgeRefused, ClientKeys, ControlClient, ControlError, DawTransport, StateFeed
from .wire import DEFAULT_ENDPOINT, VERSION, Flag, FrameHeader, WireError, decode_frame, encode_frame

__all__ = ["AudioStream", "BridgeRefused", "ClientKeys", "ControlClient", "ControlError", "DawTransport",
           "StateFeed", "DEFAULT_ENDPOINT", "VERSION", "Flag", "FrameHeader", "WireError", "decode_frame",
           "encode_frame"]
