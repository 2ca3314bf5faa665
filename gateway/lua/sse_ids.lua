-- Server-Sent Events ids for the streaming REST routes (gateway/envoy.yaml).
--
-- Envoy's grpc_json_transcoder writes each stream message as `data: {json}`
-- and a blank line, nothing else. A browser's EventSource sends Last-Event-ID
-- on reconnecting only if events carried `id:`, so this filter, which sees the
-- transcoder's output on the way out, gives each message the `id:` of its
-- event's sequence number (`{"event":{"sequence":N,...}}`, the first field
-- the transcoder prints), and the first event a `retry:` hint (in the event's
-- own block: every block stays an event with data). The service reads
-- Last-Event-ID from the call's metadata and resumes after it.
--
-- A message may be split across chunks and a chunk may hold several: complete
-- messages are passed on rewritten, the rest is held until its end arrives.

-- Milliseconds an EventSource waits before reconnecting (its default is ~3 s).
local RETRY_MS = 1000

local function with_id(message, first)
  local retry = first and ("retry: " .. RETRY_MS .. "\n") or ""
  local sequence = string.match(message, '"sequence":%s*(%d+)')
  -- 0: a stream's own failure event, not stored; the browser's
  -- Last-Event-ID stays at the last event it can resume after.
  if sequence == nil or sequence == "0" then
    return retry .. message .. "\n\n"
  end
  return retry .. "id: " .. sequence .. "\n" .. message .. "\n\n"
end

function envoy_on_response(response_handle)
  local content_type = response_handle:headers():get("content-type") or ""
  if string.find(content_type, "text/event-stream", 1, true) ~= 1 then
    return -- an error before the stream began: JSON, left alone
  end
  -- The held part of a message whose blank line has not arrived yet.
  local held, count = {}, 0
  local held_ends_in_newline = false
  local first = true
  for chunk in response_handle:bodyChunks() do
    local data = chunk:getBytes(0, chunk:length())
    local out, n = {}, 0
    local start = 1
    if held_ends_in_newline and string.byte(data, 1) == 10 then
      -- The blank line is split: "\n" held, "\n" here.
      local message = table.concat(held, "", 1, count)
      n = n + 1
      out[n] = with_id(string.sub(message, 1, -2), first)
      first = false
      held, count, start = {}, 0, 2
    end
    while true do
      local blank = string.find(data, "\n\n", start, true)
      if blank == nil then
        break
      end
      count = count + 1
      held[count] = string.sub(data, start, blank - 1)
      n = n + 1
      out[n] = with_id(table.concat(held, "", 1, count), first)
      first = false
      held, count, start = {}, 0, blank + 2
    end
    if start <= #data then
      count = count + 1
      held[count] = string.sub(data, start)
      held_ends_in_newline = string.byte(data, #data) == 10
    elseif count == 0 then
      held_ends_in_newline = false
    end
    chunk:setBytes(table.concat(out, "", 1, n))
  end
end
