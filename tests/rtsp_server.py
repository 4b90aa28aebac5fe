"""A real RTSP camera on 127.0.0.1 for the tests: Debian's GStreamer RTSP server, run by Debian's python3.

Usage: ``/usr/bin/python3 tests/rtsp_server.py PORT FOLDER [FPS]`` serves ``rtsp://127.0.0.1:PORT/cam``:
the JPEG photos ``FOLDER/000.jpg``, ``001.jpg``, ... in a loop as a live H.264 stream, FPS
frames a second, each photo held for one second. Prints ``ready`` once it listens; runs until killed.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

port, folder = sys.argv[1], sys.argv[2]
fps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
# One photo a second (multifilesrc at 1 fps), raised to FPS by repeating frames; a key frame every second.
factory.set_launch(
    f'( multifilesrc location={folder}/%03d.jpg loop=true caps="image/jpeg,framerate=1/1" ! jpegdec '
    f'! videoconvert ! videorate ! video/x-raw,framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast '
    f'key-int-max={fps} ! rtph264pay name=pay0 pt=96 )'
)
factory.set_shared(True)  # every client sees the same live stream
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print("ready", flush=True)
GLib.MainLoop().run()
