-- wrk script: PATCH /events with one 100-byte event per request.
-- Usage: wrk -s bench/wrk/patch-one.lua http://127.0.0.1:8080/events
wrk.method = "PATCH"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"topic":"ingest","data":"' .. string.rep("x", 100) .. '"}'
