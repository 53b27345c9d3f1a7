-- wrk script: PATCH /events with a batch of 100 events of 100 bytes each.
-- Events/s = requests/s x 100. Usage: wrk -s bench/wrk/patch-batch.lua URL
wrk.method = "PATCH"
wrk.headers["Content-Type"] = "application/json"
local event = '{"topic":"ingest","data":"' .. string.rep("x", 100) .. '"}'
local events = {}
for i = 1, 100 do events[i] = event end
wrk.body = "[" .. table.concat(events, ",") .. "]"
