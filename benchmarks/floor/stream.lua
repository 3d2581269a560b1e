-- wrk: a streaming POST /v1/chat/completions; the body comes from the environment
-- (WRK_BODY, JSON), so one script serves every contender.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "text/event-stream"
wrk.body = os.getenv("WRK_BODY") or
  '{"messages":[{"role":"user","content":"你好"}],"stream":true}'
