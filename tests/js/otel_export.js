'use strict'
// Services without pm2 sending spans to km with OpenTelemetry's own exporters: one trace
// through each of OTLP/HTTP JSON, OTLP/HTTP protobuf (gzip) and Zipkin v2 JSON, each a
// SERVER span with a CLIENT span below it, authenticated with the bucket's keys (HTTP
// Basic). Run by tests/tests/traces.rs; prints one JSON line:
// {"otlp-json": traceId, "otlp-proto": traceId, "zipkin": traceId}.
//
// Environment: KM_URL, KM_PUBLIC, KM_SECRET.

const { BasicTracerProvider, SimpleSpanProcessor } = require('@opentelemetry/sdk-trace-base')
const { resourceFromAttributes } = require('@opentelemetry/resources')
const { OTLPTraceExporter: OtlpJson } = require('@opentelemetry/exporter-trace-otlp-http')
const { OTLPTraceExporter: OtlpProto } = require('@opentelemetry/exporter-trace-otlp-proto')
const { ZipkinExporter } = require('@opentelemetry/exporter-zipkin')
const api = require('@opentelemetry/api')

const url = process.env.KM_URL.replace(/\/+$/, '')
const auth = 'Basic ' + Buffer.from(`${process.env.KM_PUBLIC}:${process.env.KM_SECRET}`).toString('base64')

const exporters = {
  'otlp-json': new OtlpJson({ url: `${url}/v1/traces`, headers: { authorization: auth } }),
  'otlp-proto': new OtlpProto({ url: `${url}/v1/traces`, headers: { authorization: auth }, compression: 'gzip' }),
  zipkin: new ZipkinExporter({ url: `${url}/api/v2/spans`, headers: { authorization: auth } })
}

// One exported trace: GET /checkout/<n> answering 503, calling the payments API.
async function trace (name, exporter) {
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': `svc-${name}`, 'host.name': 'otel-host' }),
    spanProcessors: [new SimpleSpanProcessor(exporter)]
  })
  const tracer = provider.getTracer('km-e2e')
  const server = tracer.startSpan('GET /checkout', {
    kind: api.SpanKind.SERVER,
    attributes: { 'http.request.method': 'GET', 'url.path': '/checkout/1234', 'http.response.status_code': 503 }
  })
  const ctx = api.trace.setSpan(api.context.active(), server)
  const call = tracer.startSpan('POST', {
    kind: api.SpanKind.CLIENT,
    attributes: { 'http.request.method': 'POST', 'url.full': 'https://payments.example.com/charges?x=1' }
  }, ctx)
  await new Promise((resolve) => setTimeout(resolve, 30))
  call.end()
  server.setStatus({ code: api.SpanStatusCode.ERROR, message: 'payments down' })
  server.end()
  await provider.forceFlush()
  await provider.shutdown()
  return server.spanContext().traceId
}

async function main () {
  // Exporters report failures through the diagnostic logger: make them fail the script.
  const failures = []
  api.diag.setLogger({ error: (...a) => failures.push(a.join(' ')), warn: () => {}, info: () => {}, debug: () => {}, verbose: () => {} }, api.DiagLogLevel.ERROR)
  const ids = {}
  for (const [name, exporter] of Object.entries(exporters)) {
    ids[name] = await trace(name, exporter)
  }
  if (failures.length) throw new Error(`export failed: ${failures.join('; ')}`)
  console.log(JSON.stringify(ids))
}

main().catch((e) => { console.error(e && e.stack ? e.stack : e); process.exit(1) })
