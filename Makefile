# Two commands do all set-up on a fresh machine:
#   make demo   recognise the bundled sample photos with the embedded model
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system-deps demo test bench clean

# Debian's GStreamer RTSP server: the real camera the video tests stream from (run by /usr/bin/python3).
RTSP_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
	gstreamer1.0-plugins-ugly

$(BIN)/wanwu: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/wanwu

demo: setup
	rm -f demo-results.jsonl
	$(BIN)/wanwu run samples --out demo-results.jsonl
	$(BIN)/wanwu show demo-results.jsonl

# Installs the RTSP server where it is missing and apt-get can (as root); otherwise the camera tests say why they skip.
system-deps:
	@/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer" \
		2>/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(RTSP_PACKAGES); } || \
		echo "make: GStreamer's RTSP server is not installed; the camera tests will skip"

test: setup system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-results.jsonl *.egg-info
