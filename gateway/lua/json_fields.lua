-- The top-level keys of a REST request's JSON body, for the service.
--
-- Envoy's grpc_json_transcoder drops JSON fields the request message does not
-- have, silently (envoyproxy/envoy#46623; it has no option to refuse them).
-- This filter runs before it on the routes with a body and names the body's
-- top-level keys in x-agentlab-json-fields, comma-separated, each as written
-- in the JSON (escapes kept) and percent-encoded; the service compares them
-- with the request message's fields, from the contract, and answers
-- INVALID_ARGUMENT naming each unknown one. Nested values are skipped; a body
-- that is not a JSON object sets no header and is left to the transcoder,
-- which rejects malformed JSON itself. A client's own value of the header is
-- always removed first.
--
-- The header stays small whatever the body (gRPC refuses metadata past 8 KiB,
-- and a huge error trailer would reset Envoy's connection to the service):
-- each distinct key once, at most MAX_KEYS of them, each cut to MAX_KEY_BYTES
-- (no field name is that long, so a cut key is still unknown); "*" last means
-- more keys were left out. A body that opens an object but is not strict JSON
-- (RFC 8259: a trailing comma, single quotes, unquoted keys), which the
-- transcoder's lenient parser would accept without these checks, is "!".

local HEADER = "x-agentlab-json-fields"
local MAX_KEYS = 32
local MAX_KEY_BYTES = 64
local MORE = "*"
local NOT_STRICT = "!"

local function skip_space(body, at)
  return (string.find(body, "[^ \t\r\n]", at)) or (#body + 1)
end

-- The index just past the string that starts (with its quote) at `at`. A
-- plain find per quote (memchr-fast, where a pattern class goes byte by byte);
-- a quote after an odd run of backslashes is escaped.
local function skip_string(body, at)
  local position = at + 1
  while true do
    local quote = string.find(body, '"', position, true)
    if quote == nil then
      return nil
    end
    local before = quote - 1
    while before > at and string.byte(body, before) == 92 do
      before = before - 1
    end
    if (quote - 1 - before) % 2 == 0 then
      return quote + 1
    end
    position = quote + 1
  end
end

-- The index just past the value that starts at `at`.
local function skip_value(body, at)
  local first = string.byte(body, at)
  if first == 34 then -- "
    return skip_string(body, at)
  end
  if first == 123 or first == 91 then -- { or [
    local depth, position = 0, at
    while true do
      local found = string.find(body, '["{}%[%]]', position)
      if found == nil then
        return nil
      end
      local byte = string.byte(body, found)
      if byte == 34 then
        position = skip_string(body, found)
        if position == nil then
          return nil
        end
      else
        if byte == 123 or byte == 91 then
          depth = depth + 1
        else
          depth = depth - 1
        end
        position = found + 1
        if depth == 0 then
          return position
        end
      end
    end
  end
  -- A number, true, false or null: up to the next delimiter.
  return (string.find(body, "[,}%] \t\r\n]", at)) or (#body + 1)
end

-- The keys of the object `body` holds, or nil if it does not hold one.
local function top_level_keys(body)
  local keys = {}
  local at = skip_space(body, 1)
  if string.byte(body, at) ~= 123 then
    return nil
  end
  at = skip_space(body, at + 1)
  if string.byte(body, at) == 125 then
    return keys
  end
  while true do
    if string.byte(body, at) ~= 34 then
      return nil
    end
    local after = skip_string(body, at)
    if after == nil then
      return nil
    end
    keys[#keys + 1] = string.sub(body, at + 1, after - 2)
    at = skip_space(body, after)
    if string.byte(body, at) ~= 58 then -- :
      return nil
    end
    at = skip_space(body, at + 1)
    if at > #body then
      return nil
    end
    at = skip_value(body, at)
    if at == nil then
      return nil
    end
    at = skip_space(body, at)
    local byte = string.byte(body, at)
    if byte == 125 then
      return keys
    end
    if byte ~= 44 then -- ,
      return nil
    end
    at = skip_space(body, at + 1)
  end
end

local function percent_encoded(text)
  return (string.gsub(text, "[^%w_%-%.]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

-- The header's value for `keys`: distinct, bounded, percent-encoded (so a
-- key never contains "," "*" or "!").
local function header_value(keys)
  local seen, listed = {}, {}
  for _, key in ipairs(keys) do
    local cut = string.sub(key, 1, MAX_KEY_BYTES)
    if not seen[cut] then
      seen[cut] = true
      if #listed == MAX_KEYS then
        listed[#listed + 1] = MORE
        break
      end
      listed[#listed + 1] = percent_encoded(cut)
    end
  end
  return table.concat(listed, ",")
end

function envoy_on_request(request_handle)
  -- The body first: a headers object taken before body() is dead after it.
  local body = request_handle:body()
  local headers = request_handle:headers()
  headers:remove(HEADER)
  if body == nil or body:length() == 0 then
    return
  end
  local text = body:getBytes(0, body:length())
  local keys = top_level_keys(text)
  if keys == nil then
    if string.byte(text, skip_space(text, 1)) == 123 then -- {
      headers:add(HEADER, NOT_STRICT)
    end
    return
  end
  headers:add(HEADER, header_value(keys))
end
