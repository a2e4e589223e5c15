"""A small TwiML interpreter: what a call does with the instructions it gets.

``<Connect><Stream>``, ``<Say>``, ``<Play>``, ``<Pause>``, ``<Dial>``, ``<Hangup>``, ``<Reject>``
and ``<Redirect>``; when a document runs out of verbs the call completes, as on Twilio.  After
``<Connect>``, Twilio goes on with the TwiML that follows once the application closes the
WebSocket ("Twilio executes the remaining TwiML instructions only after your server closes the
WebSocket connection").
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import xml.etree.ElementTree as ET
from urllib.parse import urljoin, urlsplit, urlunsplit

from callbridge.emulators.twilio.calls import CAUSE_OF_STREAM_END, DialedParty, EmulatedCall
from callbridge.emulators.twilio.core import EmulatorCore
from callbridge.emulators.twilio.media_stream import MediaStreamCaller

__all__ = ["TwimlRunner"]

_DIALABLE = re.compile(r"^\+?[0-9][0-9 ()-]{0,30}$")
_SIP_CALLER_ID = re.compile(r"^[A-Za-z0-9+\-_.]{1,64}$")


class TwimlRunner(EmulatorCore):
    """Runs each call's TwiML (fetched from the voice webhook, given over REST, or redirected)."""

    def _redirect(self, call: EmulatedCall, *, twiml: str | None, url: str | None, method: str) -> None:
        # Redirecting ends <Connect><Stream> (Twilio sends stop and closes), then runs the new TwiML.
        call.redirect_twiml = twiml if twiml else url
        call.redirects.append({"Twiml": twiml} if twiml else {"Url": url or "", "Method": method})
        old_runner = call._runner
        if old_runner is not None and not old_runner.done():
            old_runner.cancel()
        stream = call.stream
        if stream is not None and stream.is_open:
            self._spawn(stream.end_stream(send_stop=True), name=f"twilio-emu-stop-{stream.stream_sid}")
        call._runner = self._spawn(
            self._run_document(
                call, twiml=twiml, url=url, method=method, forced_cause="rest_redirect", after=stream
            ),
            name=f"twilio-emu-redirect-{call.sid}",
        )

    async def _run_outbound(self, call: EmulatedCall) -> None:
        try:
            await self._sleep(self.ring_delay)
            self._set_status(call, "ringing")
            await self._sleep(self.answer_delay)
            if self.outbound_outcome != "answer":
                self._finish_call(call, self.outbound_outcome, f"callee_{self.outbound_outcome}")
                return
            self._answer(call)
            await self._run_document(
                call, twiml=call._pending_twiml, url=call._pending_url, method=call._pending_method
            )
        finally:
            call._settled.set()

    async def _run_document(
        self,
        call: EmulatedCall,
        *,
        twiml: str | None,
        url: str | None,
        method: str = "POST",
        forced_cause: str | None = None,
        after: MediaStreamCaller | None = None,
        webhook_signature: str | None = None,
    ) -> None:
        try:
            if after is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.stream_close_timeout + 1.0):
                        await after.closed.wait()
            doc_url = url
            if twiml is None:
                if url is None:
                    self._finish_call(call, "completed", forced_cause or "twiml_finished")
                    return
                twiml = await self._fetch_twiml(call, url, method, signature=webhook_signature)
                if twiml is None:
                    # Twilio says "an application error has occurred" and hangs up.
                    self._answer(call)
                    self._finish_call(call, "completed", forced_cause or "webhook_error", "webhook_error")
                    return
            await self._execute(call, twiml, doc_url, forced_cause)
        finally:
            call._settled.set()

    async def _execute(
        self, call: EmulatedCall, twiml: str, doc_url: str | None, forced_cause: str | None
    ) -> None:
        call.twiml_documents.append(twiml)
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError as exc:
            call.twiml_errors.append(f"invalid XML: {exc}")
            root = None
        if root is None or root.tag != "Response":
            if root is not None:
                call.twiml_errors.append(f"root element is <{root.tag}>, not <Response>")
            self._answer(call)
            self._finish_call(call, "completed", forced_cause or "twiml_error", "twiml_error")
            return
        natural_end = "twiml_finished"
        for verb in list(root):
            if call.is_ended:
                return
            tag = verb.tag
            text = (verb.text or "").strip()
            if tag == "Connect":
                stream_el = verb.find("Stream")
                if stream_el is None:
                    call.unsupported_verbs.append("Connect/" + ",".join(child.tag for child in verb))
                    continue
                self._answer(call)
                caller = await self._open_stream(call, stream_el, doc_url)
                await caller.closed.wait()
                if call.is_ended:
                    return
                # Our server closed the socket: Twilio goes on with the TwiML after <Connect>.
                natural_end = CAUSE_OF_STREAM_END.get(caller.closed_by or "", "stream_closed")
            elif tag == "Say":
                self._answer(call)
                call.said.append(text)
                await self._sleep(self.say_seconds)
            elif tag == "Play":
                self._answer(call)
                call.played.append(text or verb.get("digits", ""))
                await self._sleep(self.say_seconds)
            elif tag == "Pause":
                self._answer(call)
                await self._sleep(self.say_seconds)
            elif tag == "Dial":
                self._answer(call)
                parties = self._dial_parties(call, verb, text)
                call.dials.extend(parties)
                call.dialed.extend(p.target for p in parties)
                if not any(p.status == "completed" for p in parties):
                    natural_end = "dial_failed"
                    continue  # Twilio goes on with the next verb (no action URL here)
                if self.dial_seconds is None:
                    await call.ended.wait()
                    return
                await self._sleep(self.dial_seconds)
                natural_end = "dial_finished"
            elif tag == "Hangup":
                self._answer(call)
                self._finish_call(call, "completed", forced_cause or "twiml_hangup", "twiml_hangup")
                return
            elif tag == "Reject":
                # Whether Twilio reports reason="rejected" as busy or no-answer is not documented in
                # our specs; both are reported as "busy", with the reason kept in reject_reason.
                call.reject_reason = verb.get("reason", "rejected")
                if call.answered_time is None:
                    self._finish_call(call, "busy", forced_cause or "rejected", "rejected")
                else:
                    self._finish_call(call, "completed", forced_cause or "rejected", "rejected")
                return
            elif tag == "Redirect":
                target = urljoin(doc_url or "", text) if doc_url else text
                await self._run_document(
                    call,
                    twiml=None,
                    url=target,
                    method=verb.get("method", "POST").upper(),
                    forced_cause=forced_cause,
                )
                return
            else:
                call.unsupported_verbs.append(tag)
        self._finish_call(call, "completed", forced_cause or natural_end, natural_end)

    def _dial_parties(self, call: EmulatedCall, verb: ET.Element, text: str) -> list[DialedParty]:
        """The nouns of one ``<Dial>`` and whether Twilio would place each, from the docs: a
        ``<Number>`` (or bare text) may only show the calling number, the called number or a
        verified number as ``callerId`` (warning 13214); for ``<Sip>`` any string of letters,
        digits and ``+-_.`` will do; one ``<Sip>`` per ``<Dial>``, with no other noun; a SIP
        URI is under 255 characters."""
        caller_id = verb.get("callerId")
        now = asyncio.get_running_loop().time()
        nouns = [(child.tag, (child.text or "").strip()) for child in verb] or [("Number", text)]
        sips = sum(1 for tag, _ in nouns if tag == "Sip")
        parties = []
        for tag, target in nouns:
            kind = {"Number": "number", "Sip": "sip", "Client": "client"}.get(tag, tag.lower())
            problem = None
            if tag == "Sip":
                if sips > 1 or len(nouns) > 1:
                    problem = "one <Sip> per <Dial>, and no other noun beside it"
                elif not target.startswith(("sip:", "sips:")) or len(target) >= 255:
                    problem = "<Sip> needs a sip: URI under 255 characters"
                elif caller_id is not None and not _SIP_CALLER_ID.fullmatch(caller_id):
                    problem = "13214 Dial: Invalid callerId value"
            elif tag == "Number":
                if not _DIALABLE.fullmatch(target):
                    problem = f"<Number> {target!r} is not a phone number"
                elif caller_id is not None and caller_id not in (
                    call.from_,
                    call.to,
                    *self.verified_caller_ids,
                ):
                    problem = "13214 Dial: Invalid callerId value"
            elif tag != "Client":
                problem = f"<{tag}> is not a noun of <Dial> this emulator knows"
            if problem is not None:
                call.twiml_errors.append(problem)
            status = "failed" if problem else "completed"
            parties.append(DialedParty(kind, target, caller_id, status, problem, now))
        return parties

    async def _open_stream(
        self, call: EmulatedCall, stream_el: ET.Element, doc_url: str | None
    ) -> MediaStreamCaller:
        raw_url = stream_el.get("url", "")
        url = raw_url
        if doc_url and not urlsplit(raw_url).scheme:
            # A relative url is resolved against the document's URL, http(s) -> ws(s).
            joined = urlsplit(urljoin(doc_url, raw_url))
            url = urlunsplit(
                joined._replace(scheme={"https": "wss", "http": "ws"}.get(joined.scheme, joined.scheme))
            )
        params: dict[str, str] = {}
        for param in stream_el.findall("Parameter"):
            name = param.get("name")
            if name is not None:
                params[name] = param.get("value", "")
        audio = call.caller_audio if not call.streams else b""
        caller = MediaStreamCaller(
            url,
            account_sid=self.account_sid,
            auth_token=self.auth_token,
            call_sid=call.sid,
            audio=audio,
            custom_parameters=params,
            signature=call._stream_signature,
            sign=self.sign_requests,
            open_timeout=self.stream_open_timeout,
            close_timeout=self.stream_close_timeout,
            record_media=self.record_media,
            frame_interval=self.media_frame_interval,
            connect_to=await self._upgrade_faults.address(self.stream_upgrade_fault),
        )
        call.stream_upgrade_fault = self.stream_upgrade_fault
        caller.on_hangup = lambda _: self._finish_call(call, "completed", "caller_hangup")
        call.streams.append(caller)
        call.stream = caller
        if await caller.connect():
            call.stream_connected.set()
        call._settled.set()
        return caller
