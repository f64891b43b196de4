// Checks captured deliveries with the official Node libraries, as a receiver would.
//
// Usage: node verify.js CASES_JSON. Prints one JSON object: for every case, whether
// the Standard Webhooks library accepted it (and its error), and for CloudEvents
// cases the event the CloudEvents SDK parsed. tests/interop.rs judges the outcome;
// the lines docs/user-guide.md shows are used here verbatim (the test checks that too).
"use strict";
const fs = require("fs");
const { Webhook } = require("standardwebhooks");
const { HTTP } = require("cloudevents");

function check(c) {
  const key = Buffer.from(c.key);
  const body = Buffer.from(c.body_b64, "base64");
  const headers = c.headers;
  const result = { accepted: false, error: null, event: null };
  try {
    const payload = new Webhook("whsec_" + key.toString("base64")).verify(body, headers); // throws if invalid
    result.accepted = payload !== undefined;
  } catch (e) {
    result.error = `${e.name}: ${e.message}`;
    return result;
  }
  if (c.format === "cloudevents") {
    const event = HTTP.toEvent({ headers, body: body.toString() }); // format: cloudevents
    event.validate(); // throws unless the event conforms to the spec
    result.event = {
      specversion: event.specversion,
      type: event.type,
      source: event.source,
      subject: event.subject,
      id: event.id,
      time: event.time,
      datacontenttype: event.datacontenttype,
      data: event.data,
    };
  }
  return result;
}

const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const results = {};
for (const c of cases) results[c.name] = check(c);
console.log(JSON.stringify(results));
