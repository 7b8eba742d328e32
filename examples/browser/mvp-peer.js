// A browser peer for mvpd: the signaling protocol over a WebSocket and one RTCPeerConnection
// with the main data channel (label "mvp", protocol = mode). No dependencies, no build step.
//
// Signaling (README.md "Signaling protocol"): one JSON object per text frame,
//   {type: "register", id, token?}
//   {type: "offer" | "answer", from, to, sdp}
//   {type: "candidate", from, to, candidate: RTCIceCandidateInit | null}   (null or "" = end)
//   {type: "bye", from, to, reason?}
// The daemon (aiortc) puts all its candidates in its SDP and never trickles; this page
// trickles its own, like every browser, and queues any that arrive before the offer/answer.
//
// Everything the page knows is in `window.mvp.state` (read by tests through DevTools).
"use strict";

(function () {
  const LABEL = "mvp";
  const MODES = ["chat", "json", "bytes"];
  const RETRY_OFFER_MS = 2000;
  const MAX_OFFER_RETRIES = 30;
  // Reconnect delays double from the first to the last (an id held by a live connection elsewhere,
  // close code 4010, must not be retried every two seconds for ever); a registration resets them.
  const RECONNECT_FIRST_MS = 2000;
  const RECONNECT_LAST_MS = 30000;
  let reconnectMs = RECONNECT_FIRST_MS;
  // Close codes from our reference server after which reconnecting cannot help.
  const FINAL_CLOSE_CODES = { 4003: "bad token", 4009: "replaced by a newer connection" };
  const ID_IN_USE = 4010;

  const state = {
    signaling: "idle", // idle | connecting | open | registered | closed
    connection: "new", // RTCPeerConnection.connectionState
    channel: "none", // none | connecting | open | closed
    // How the last channel ended: "" (not yet), "closed" (a clean close by either side), or
    // the RTCError the browser reported (an SCTP abort, for example).
    channelEnd: "",
    role: "", // offer | answer
    id: "",
    peer: "",
    mode: "",
    // The peer's identity: the sha-256 fingerprint in its offer or answer. The daemon shows
    // its own with `mvpctl id`; compare them to know the signaling server did not swap it.
    peerFingerprint: "",
    received: [], // messages from the peer, as shown
    sent: [],
    candidatesSent: 0,
    localCandidates: [], // what this page trickled, as candidate strings
    candidatesReceived: 0,
    errors: [],
    log: [],
  };

  let options = null;
  let ws = null;
  let pc = null;
  let channel = null;
  let pendingCandidates = [];
  let offerRetries = 0;
  // One certificate for every connection of this page, so that its identity (fingerprint)
  // stays the same across reconnects: daemons that remember peers (trust on first use)
  // refuse a changed one. A reloaded page makes a new one.
  let certificate = null;
  let stopped = false;

  // --- output -----------------------------------------------------------------------------

  function ui(id) {
    return document.getElementById(id);
  }

  function log(text) {
    const line = new Date().toISOString().slice(11, 23) + " " + text;
    state.log.push(line);
    if (state.log.length > 500) state.log.shift();
    const box = ui("log");
    if (box) {
      box.textContent += line + "\n";
      box.scrollTop = box.scrollHeight;
    }
  }

  function error(text) {
    state.errors.push(text);
    log("error: " + text);
  }

  function showMessage(who, text) {
    const box = ui("messages");
    if (!box) return;
    const div = document.createElement("div");
    div.className = who;
    div.textContent = (who === "in" ? state.peer + ": " : "me: ") + text;
    box.appendChild(div);
    box.scrollTop = box.scrollHeight;
  }

  function showState() {
    const box = ui("state");
    if (box) {
      box.textContent =
        "signaling " + state.signaling + " · connection " + state.connection +
        " · channel " + state.channel + (state.mode ? " (" + state.mode + ")" : "") +
        (state.peerFingerprint ? " · peer identity " + state.peerFingerprint : "");
    }
    const send = ui("send");
    if (send) send.disabled = state.channel !== "open";
  }

  // --- signaling ----------------------------------------------------------------------------

  function signal(message) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      error("signaling is not connected; " + message.type + " not sent");
      return;
    }
    message.from = state.id;
    ws.send(JSON.stringify(message));
  }

  function connectSignaling() {
    state.signaling = "connecting";
    showState();
    let socket;
    try {
      socket = new WebSocket(options.signal);
    } catch (e) {
      error("bad signaling URL " + options.signal + ": " + e.message);
      state.signaling = "closed";
      showState();
      return;
    }
    ws = socket;
    socket.onopen = () => {
      state.signaling = "open";
      const register = { type: "register", id: state.id };
      if (options.token) register.token = options.token;
      socket.send(JSON.stringify(register));
      // Servers that only route never confirm a registration: go on at once.
      state.signaling = "registered";
      log("registered as " + state.id + " on " + options.signal);
      showState();
      if (state.role === "offer" && !pc) startOffer();
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (e) {
        error("signaling frame is not JSON");
        return;
      }
      if (!message || typeof message.type !== "string") {
        error("signaling frame without a type");
        return;
      }
      onSignal(message).catch((e) => error(message.type + ": " + e.message));
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      state.signaling = "closed";
      showState();
      const final = FINAL_CLOSE_CODES[event.code];
      if (final) {
        error("signaling closed: " + final + (event.reason ? " (" + event.reason + ")" : ""));
        return;
      }
      if (event.code === ID_IN_USE) {
        error("the id " + state.id + " is in use by a live connection; retrying in " +
              reconnectMs / 1000 + " s");
      } else {
        log("signaling closed (" + event.code + "); reconnecting in " + reconnectMs / 1000 + " s");
      }
      if (!stopped) setTimeout(connectSignaling, reconnectMs);
      reconnectMs = Math.min(reconnectMs * 2, RECONNECT_LAST_MS);
    };
  }

  async function onSignal(message) {
    switch (message.type) {
      case "registered":
        reconnectMs = RECONNECT_FIRST_MS;
        return;
      case "error":
        return onServerError(message);
      case "offer":
        return onOffer(message);
      case "answer":
        return onAnswer(message);
      case "candidate":
        return onCandidate(message);
      case "bye":
        return onBye(message);
      default:
        log("ignored a " + message.type + " message");
    }
  }

  function fromPeer(message) {
    if (state.peer && message.from !== state.peer) {
      log("ignored a " + message.type + " from " + message.from + " (talking to " + state.peer + ")");
      return false;
    }
    return true;
  }

  function onServerError(message) {
    const text = "server: " + message.code + (message.message ? ": " + message.message : "");
    if (message.code === "offline" && message.about !== "offer") {
      // Candidates and byes for a peer that is not there: the offer's error says it all.
      log(text);
      return;
    }
    if (message.code === "offline" && message.about === "offer" && state.role === "offer") {
      // The daemon is not on the signaling server (yet): offer again in a moment.
      closePeerConnection();
      if (offerRetries++ < MAX_OFFER_RETRIES) {
        log(state.peer + " is not connected; offering again in " + RETRY_OFFER_MS / 1000 + " s");
        setTimeout(() => { if (!pc && !stopped) startOffer(); }, RETRY_OFFER_MS);
        return;
      }
    }
    error(text);
  }

  // --- the peer connection ------------------------------------------------------------------

  function newPeerConnection() {
    closePeerConnection();
    // No ICE servers unless given: direct paths only (the daemon's own STUN/TURN settings
    // still apply). `relayOnly` sends everything through the TURN server given.
    const conn = new RTCPeerConnection({
      iceServers: options.iceServers,
      iceTransportPolicy: options.relayOnly ? "relay" : "all",
      certificates: certificate ? [certificate] : undefined,
    });
    pc = conn;
    pendingCandidates = [];
    conn.onicecandidate = (event) => {
      if (pc !== conn) return;
      // null = end-of-candidates, which the protocol carries as a null candidate.
      const init = event.candidate ? event.candidate.toJSON() : null;
      if (init) {
        state.candidatesSent += 1;
        state.localCandidates.push(init.candidate);
        log("candidate " + init.candidate);
      }
      signal({ type: "candidate", to: state.peer, candidate: init });
    };
    conn.onconnectionstatechange = () => {
      if (pc !== conn) return;
      state.connection = conn.connectionState;
      log("connection " + conn.connectionState);
      showState();
    };
    conn.ondatachannel = (event) => {
      if (pc !== conn) return;
      if (event.channel.label === LABEL) {
        attachChannel(event.channel);
      } else {
        log("ignoring channel " + JSON.stringify(event.channel.label) + " (this page only chats)");
      }
    };
    state.connection = conn.connectionState;
    showState();
    return conn;
  }

  function closePeerConnection() {
    if (channel) {
      channel.onopen = channel.onclose = channel.onmessage = channel.onerror = null;
      channel.close();
      channel = null;
    }
    if (pc) {
      pc.close();
      pc = null;
    }
    pendingCandidates = [];
    state.channel = "none";
    state.connection = "closed";
    showState();
  }

  async function startOffer() {
    state.role = "offer";
    const conn = newPeerConnection();
    attachChannel(conn.createDataChannel(LABEL, { ordered: true, protocol: state.mode }));
    const offer = await conn.createOffer();
    await conn.setLocalDescription(offer);
    if (options.candidatesFirst) {
      // Every candidate is trickled before the offer leaves, and the offer carries none (as
      // when a signaling path delivers candidates ahead of the offer).
      await gatheringComplete(conn);
      if (pc !== conn) return;
      signal({ type: "offer", to: state.peer, sdp: offer.sdp });
      log("offered " + state.mode + " to " + state.peer + " after " + state.candidatesSent +
        " candidates");
      return;
    }
    if (pc !== conn) return;
    signal({ type: "offer", to: state.peer, sdp: conn.localDescription.sdp });
    log("offered " + state.mode + " to " + state.peer);
  }

  function notePeerFingerprint(sdp) {
    const line = sdp.split(/\r?\n/).find((l) => /^a=fingerprint:sha-256 /i.test(l));
    state.peerFingerprint = line ? "sha-256 " + line.split(" ")[1].toUpperCase() : "";
    log("peer identity " + (state.peerFingerprint || "missing from its SDP"));
    showState();
  }

  function gatheringComplete(conn) {
    if (conn.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      conn.addEventListener("icegatheringstatechange", () => {
        if (conn.iceGatheringState === "complete") resolve();
      });
    });
  }

  async function onOffer(message) {
    if (!fromPeer(message)) return;
    if (pc && pc.signalingState === "have-local-offer") {
      // Glare, resolved as the daemon does it: the lower id yields and answers.
      if (state.id > message.from) {
        log("both sides offered; " + message.from + " < " + state.id + ", so it answers");
        return;
      }
      log("both sides offered; answering " + message.from);
    }
    state.peer = message.from;
    state.role = "answer";
    const conn = newPeerConnection();
    notePeerFingerprint(message.sdp);
    await conn.setRemoteDescription({ type: "offer", sdp: message.sdp });
    await flushCandidates(conn);
    const answer = await conn.createAnswer();
    await conn.setLocalDescription(answer);
    if (pc !== conn) return;
    signal({ type: "answer", to: state.peer, sdp: conn.localDescription.sdp });
    log("answered " + state.peer);
  }

  async function onAnswer(message) {
    if (!fromPeer(message)) return;
    if (!pc || pc.signalingState !== "have-local-offer") {
      log("ignored an answer: no offer of ours is pending");
      return;
    }
    const conn = pc;
    notePeerFingerprint(message.sdp);
    await conn.setRemoteDescription({ type: "answer", sdp: message.sdp });
    offerRetries = 0;
    await flushCandidates(conn);
    log("got the answer from " + message.from);
  }

  async function onCandidate(message) {
    if (!fromPeer(message)) return;
    state.candidatesReceived += 1;
    const init = message.candidate;
    // Candidates may come before the offer or answer: keep them until it is there.
    if (!pc || !pc.remoteDescription) {
      pendingCandidates.push(init);
      return;
    }
    await addCandidate(pc, init);
  }

  async function flushCandidates(conn) {
    const queued = pendingCandidates;
    pendingCandidates = [];
    for (const init of queued) await addCandidate(conn, init);
  }

  async function addCandidate(conn, init) {
    try {
      if (!init || !init.candidate) {
        await conn.addIceCandidate(); // end-of-candidates
      } else {
        await conn.addIceCandidate(init);
      }
    } catch (e) {
      log("candidate not added: " + e.message);
    }
  }

  function onBye(message) {
    if (!fromPeer(message)) return;
    log(message.from + " said bye" + (message.reason ? ": " + message.reason : ""));
    closePeerConnection();
    // Waiting for anyone's offer again unless a peer was named.
    if (state.role === "answer") state.peer = options.peer || "";
  }

  // --- the data channel ---------------------------------------------------------------------

  function attachChannel(ch) {
    channel = ch;
    ch.binaryType = "arraybuffer";
    state.channel = "connecting";
    ch.onopen = () => {
      if (channel !== ch) return;
      state.channel = "open";
      state.mode = ch.protocol || state.mode;
      log("channel open, mode " + state.mode);
      showState();
      if (options.send) sendLine(options.send);
    };
    ch.onerror = (event) => {
      if (channel !== ch) return;
      const e = event.error || {};
      const detail = (e.errorDetail || "error") +
        (e.sctpCauseCode ? ", cause " + e.sctpCauseCode : "") +
        (e.message ? " (" + e.message + ")" : "");
      state.channelEnd = detail;
      error("channel failed: " + detail);
    };
    ch.onclose = () => {
      if (channel !== ch) return;
      state.channel = "closed";
      if (!state.channelEnd) state.channelEnd = "closed";
      log("channel closed");
      showState();
    };
    ch.onmessage = (event) => {
      const text = describe(event.data);
      state.received.push(text);
      showMessage("in", text);
    };
    showState();
  }

  function describe(data) {
    if (typeof data === "string") return data;
    const bytes = new Uint8Array(data);
    if (state.mode === "bytes") {
      const hex = Array.from(bytes.slice(0, 64), (b) => b.toString(16).padStart(2, "0"));
      return "[" + bytes.length + " bytes] " + hex.join(" ") + (bytes.length > 64 ? " ..." : "");
    }
    return new TextDecoder().decode(bytes);
  }

  function sendLine(line) {
    if (!channel || channel.readyState !== "open") {
      error("the channel is not open");
      return false;
    }
    if (state.mode === "json") {
      try {
        JSON.parse(line);
      } catch (e) {
        error("not JSON: " + e.message);
        return false;
      }
    }
    channel.send(state.mode === "bytes" ? new TextEncoder().encode(line) : line);
    state.sent.push(line);
    showMessage("out", line);
    return true;
  }

  // --- start --------------------------------------------------------------------------------

  function start(opts) {
    options = Object.assign({
      token: "", send: "", offer: false, iceServers: [], relayOnly: false, candidatesFirst: false,
    }, opts);
    state.id = options.id;
    state.peer = options.peer || "";
    state.mode = MODES.includes(options.mode) ? options.mode : "chat";
    state.role = options.offer ? "offer" : "answer";
    if (state.role === "offer" && !state.peer) {
      error("offering needs a peer id");
      return;
    }
    stopped = false;
    log("starting as " + state.id + (state.role === "offer"
      ? ", offering " + state.mode + " to " + state.peer
      : ", waiting for an offer" + (state.peer ? " from " + state.peer : "")));
    RTCPeerConnection.generateCertificate({ name: "ECDSA", namedCurve: "P-256" })
      .then((made) => { certificate = made; })
      .catch((err) => log("no page certificate (" + err + "); one per connection"))
      .finally(connectSignaling);
  }

  function stop() {
    stopped = true;
    if (state.peer && pc) signal({ type: "bye", to: state.peer });
    closePeerConnection();
    if (ws) ws.close();
  }

  window.mvp = { state, start, stop, send: sendLine };
})();
