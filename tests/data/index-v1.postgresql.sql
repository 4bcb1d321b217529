
SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

CREATE TABLE public.instance (
    id integer NOT NULL,
    sop_uid text NOT NULL,
    series_id integer NOT NULL,
    sop_class_uid text NOT NULL,
    instance_number integer,
    transfer_syntax text NOT NULL,
    path text NOT NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    received_at timestamp without time zone NOT NULL,
    calling_aet text NOT NULL,
    json text NOT NULL,
    state integer NOT NULL
);

CREATE SEQUENCE public.instance_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.instance_id_seq OWNED BY public.instance.id;

CREATE TABLE public.patient (
    id integer NOT NULL,
    patient_id text NOT NULL,
    issuer text NOT NULL,
    patient_name text NOT NULL,
    name_key text NOT NULL,
    birth_date text NOT NULL,
    sex text NOT NULL,
    num_studies integer NOT NULL,
    num_series integer NOT NULL,
    num_instances integer NOT NULL
);

CREATE SEQUENCE public.patient_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.patient_id_seq OWNED BY public.patient.id;

CREATE TABLE public.series (
    id integer NOT NULL,
    series_uid text NOT NULL,
    study_id integer NOT NULL,
    modality text NOT NULL,
    series_number integer,
    description text NOT NULL,
    num_instances integer NOT NULL
);

CREATE SEQUENCE public.series_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.series_id_seq OWNED BY public.series.id;

CREATE TABLE public.study (
    id integer NOT NULL,
    study_uid text NOT NULL,
    patient_id integer NOT NULL,
    study_date text NOT NULL,
    study_time text NOT NULL,
    time_key text NOT NULL,
    accession_number text NOT NULL,
    study_id text NOT NULL,
    referring_physician text NOT NULL,
    description text NOT NULL,
    modalities text NOT NULL,
    sop_classes text NOT NULL,
    num_series integer NOT NULL,
    num_instances integer NOT NULL,
    updated_at timestamp without time zone NOT NULL
);

CREATE SEQUENCE public.study_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.study_id_seq OWNED BY public.study.id;

CREATE TABLE public.studymodality (
    id integer NOT NULL,
    study_id integer NOT NULL,
    modality text NOT NULL
);

CREATE SEQUENCE public.studymodality_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.studymodality_id_seq OWNED BY public.studymodality.id;

ALTER TABLE ONLY public.instance ALTER COLUMN id SET DEFAULT nextval('public.instance_id_seq'::regclass);

ALTER TABLE ONLY public.patient ALTER COLUMN id SET DEFAULT nextval('public.patient_id_seq'::regclass);

ALTER TABLE ONLY public.series ALTER COLUMN id SET DEFAULT nextval('public.series_id_seq'::regclass);

ALTER TABLE ONLY public.study ALTER COLUMN id SET DEFAULT nextval('public.study_id_seq'::regclass);

ALTER TABLE ONLY public.studymodality ALTER COLUMN id SET DEFAULT nextval('public.studymodality_id_seq'::regclass);

INSERT INTO public.instance VALUES (1, '1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322', 1, '1.2.840.10008.5.1.4.1.1.2', 1, '1.2.840.10008.1.2.1', '1.3.6.1.4.1.5962.1.2.1.20040119072730.12322/1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322/1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322.dcm', 39206, '3dd31e5cc835b3f2cdd46c9da1982f59251e78518fefa8163d914631c66437d6', '2026-11-26 00:52:14.90075', '', '{"00080005":{"vr":"CS","Value":["ISO_IR 100"]},"00080008":{"vr":"CS","Value":["ORIGINAL","PRIMARY","AXIAL"]},"00080012":{"vr":"DA","Value":["20040119"]},"00080013":{"vr":"TM","Value":["072731"]},"00080014":{"vr":"UI","Value":["1.3.6.1.4.1.5962.3"]},"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]},"00080018":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"]},"00080020":{"vr":"DA","Value":["20040119"]},"00080021":{"vr":"DA","Value":["19970430"]},"00080022":{"vr":"DA","Value":["19970430"]},"00080023":{"vr":"DA","Value":["19970430"]},"00080030":{"vr":"TM","Value":["072730"]},"00080031":{"vr":"TM","Value":["112749"]},"00080032":{"vr":"TM","Value":["112936"]},"00080033":{"vr":"TM","Value":["113008"]},"00080050":{"vr":"SH"},"00080060":{"vr":"CS","Value":["CT"]},"00080070":{"vr":"LO","Value":["GE MEDICAL SYSTEMS"]},"00080080":{"vr":"LO","Value":["JFK IMAGING CENTER"]},"00080090":{"vr":"PN"},"00080201":{"vr":"SH","Value":["-0500"]},"00081010":{"vr":"SH","Value":["CT01_OC0"]},"00081030":{"vr":"LO","Value":["e+1"]},"00081090":{"vr":"LO","Value":["RHAPSODE"]},"00090010":{"vr":"LO","Value":["GEMS_IDEN_01"]},"00091001":{"vr":"LO","Value":["GE_GENESIS_FF"]},"00091002":{"vr":"SH","Value":["CT01"]},"00091004":{"vr":"SH","Value":["HiSpeed CT/i"]},"00091027":{"vr":"SL","Value":[862399669]},"00091030":{"vr":"SH"},"00091031":{"vr":"SH"},"000910E6":{"vr":"SH","Value":["05"]},"000910E7":{"vr":"UL","Value":[973283917]},"000910E9":{"vr":"SL","Value":[862399669]},"00100010":{"vr":"PN","Value":[{"Alphabetic":"CompressedSamples^CT1"}]},"00100020":{"vr":"LO","Value":["1CT1"]},"00100030":{"vr":"DA"},"00100040":{"vr":"CS","Value":["O"]},"00101002":{"vr":"SQ","Value":[{"00100020":{"vr":"LO","Value":["ABCD1234"]},"00100022":{"vr":"CS","Value":["TEXT"]}},{"00100020":{"vr":"LO","Value":["1234ABCD"]},"00100022":{"vr":"CS","Value":["TEXT"]}}]},"00101010":{"vr":"AS","Value":["000Y"]},"00101030":{"vr":"DS","Value":[0.0]},"001021B0":{"vr":"LT"},"00110010":{"vr":"LO","Value":["GEMS_PATI_01"]},"00111010":{"vr":"SS","Value":[0]},"00180010":{"vr":"LO","Value":["ISOVUE300/100"]},"00180022":{"vr":"CS","Value":["HELICAL MODE"]},"00180050":{"vr":"DS","Value":[5.0]},"00180060":{"vr":"DS","Value":[120.0]},"00180088":{"vr":"DS","Value":[5.0]},"00180090":{"vr":"DS","Value":[480.0]},"00181020":{"vr":"LO","Value":["05"]},"00181040":{"vr":"LO","Value":["IV"]},"00181100":{"vr":"DS","Value":[338.6716]},"00181110":{"vr":"DS","Value":[1099.3100585938]},"00181111":{"vr":"DS","Value":[630.0]},"00181120":{"vr":"DS","Value":[0.0]},"00181130":{"vr":"DS","Value":[133.699997]},"00181150":{"vr":"IS","Value":[1601]},"00181151":{"vr":"IS","Value":[170]},"00181152":{"vr":"IS","Value":[170]},"00181160":{"vr":"SH","Value":["LARGE BOWTIE FIL"]},"00181190":{"vr":"DS","Value":[0.7]},"00181210":{"vr":"SH","Value":["STANDARD"]},"00185100":{"vr":"CS","Value":["FFS"]},"00190010":{"vr":"LO","Value":["GEMS_ACQU_01"]},"00191002":{"vr":"SL","Value":[912]},"00191003":{"vr":"DS","Value":[373.75]},"00191004":{"vr":"DS","Value":[1.0166]},"0019100F":{"vr":"DS","Value":[955.799988]},"00191011":{"vr":"SS","Value":[2]},"00191013":{"vr":"SS","Value":[0]},"00191014":{"vr":"SS","Value":[0]},"00191015":{"vr":"SS","Value":[0]},"00191016":{"vr":"SS","Value":[0]},"00191017":{"vr":"SS","Value":[2]},"00191018":{"vr":"LO","Value":["S"]},"00191019":{"vr":"DS","Value":[7.79187]},"0019101A":{"vr":"LO","Value":["I"]},"0019101B":{"vr":"DS","Value":[-320.197968]},"0019101E":{"vr":"DS","Value":[0.0]},"00191023":{"vr":"DS","Value":[5.0]},"00191024":{"vr":"DS","Value":[17.784578]},"00191025":{"vr":"SS","Value":[1]},"00191026":{"vr":"SL","Value":[0]},"00191027":{"vr":"DS","Value":[1.0]},"0019102A":{"vr":"DS","Value":[178.079926]},"0019102B":{"vr":"DS","Value":[3994.299316]},"0019102C":{"vr":"SL","Value":[10431]},"0019102E":{"vr":"DS","Value":[-718.079956]},"0019102F":{"vr":"DS","Value":[984.0]},"00191039":{"vr":"SS","Value":[16]},"00191040":{"vr":"SS","Value":[0]},"00191041":{"vr":"SS","Value":[1]},"00191042":{"vr":"SS","Value":[0]},"00191043":{"vr":"SS","Value":[0]},"00191044":{"vr":"DS","Value":[1.0]},"00191047":{"vr":"SS","Value":[1]},"0019104A":{"vr":"SS","Value":[6]},"0019104B":{"vr":"SL","Value":[10431]},"00191052":{"vr":"SS","Value":[1]},"00191057":{"vr":"SS","Value":[-95]},"00191058":{"vr":"SS","Value":[0]},"0019105E":{"vr":"SL","Value":[763]},"0019105F":{"vr":"SL","Value":[1]},"00191060":{"vr":"SL","Value":[1969]},"00191061":{"vr":"SL","Value":[1576]},"00191062":{"vr":"SL","Value":[1]},"0019106A":{"vr":"SS","Value":[4]},"0019106B":{"vr":"SS","Value":[852]},"00191070":{"vr":"SS","Value":[1]},"00191071":{"vr":"SS","Value":[0]},"00191072":{"vr":"DS","Value":[0.0]},"00191073":{"vr":"DS","Value":[0.0]},"00191074":{"vr":"DS","Value":[0.0]},"00191075":{"vr":"DS","Value":[0.0]},"00191076":{"vr":"DS","Value":[0.0]},"001910DA":{"vr":"SS","Value":[0]},"001910DB":{"vr":"DS","Value":[0.0]},"001910DC":{"vr":"SS","Value":[1]},"001910DD":{"vr":"SS","Value":[1]},"001910DE":{"vr":"DS","Value":[0.0]},"0020000D":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"]},"0020000E":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"]},"00200010":{"vr":"SH","Value":["1CT1"]},"00200011":{"vr":"IS","Value":[1]},"00200012":{"vr":"IS","Value":[2]},"00200013":{"vr":"IS","Value":[1]},"00200032":{"vr":"DS","Value":[-158.135803,-179.035797,-75.699997]},"00200037":{"vr":"DS","Value":[1.0,0.0,0.0,0.0,1.0,0.0]},"00200052":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.4.1.1.20040119072730.12322"]},"00200060":{"vr":"CS"},"00201040":{"vr":"LO","Value":["SN"]},"00201041":{"vr":"DS","Value":[-77.2040634155]},"00204000":{"vr":"LT","Value":["Uncompressed"]},"00210010":{"vr":"LO","Value":["GEMS_RELA_01"]},"00211003":{"vr":"SS","Value":[2]},"00211005":{"vr":"SH","Value":["05"]},"00211007":{"vr":"UL","Value":[1605775145]},"00211015":{"vr":"US","Value":[24078]},"00211016":{"vr":"SS","Value":[2]},"00211018":{"vr":"SH","Value":["05"]},"00211019":{"vr":"UL","Value":[750675506]},"00211037":{"vr":"SS","Value":[16]},"0021104A":{"vr":"LO"},"00211090":{"vr":"SS","Value":[7400]},"00211091":{"vr":"SS","Value":[0]},"00211092":{"vr":"FL","Value":[0.0]},"00211093":{"vr":"FL","Value":[0.0]},"00230010":{"vr":"LO","Value":["GEMS_STDY_01"]},"00231070":{"vr":"FD","Value":[862399761.111079]},"00231074":{"vr":"SL","Value":[1]},"0023107D":{"vr":"SS","Value":[0]},"00250010":{"vr":"LO","Value":["GEMS_SERS_01"]},"00251006":{"vr":"SS","Value":[0]},"00251007":{"vr":"SL","Value":[44]},"00251010":{"vr":"SL","Value":[0]},"00251011":{"vr":"SS","Value":[0]},"00251017":{"vr":"SL","Value":[0]},"00251018":{"vr":"SL","Value":[0]},"00251019":{"vr":"SL","Value":[4]},"0025101A":{"vr":"SH"},"00270010":{"vr":"LO","Value":["GEMS_IMAG_01"]},"00271006":{"vr":"SL","Value":[1]},"00271010":{"vr":"SS","Value":[0]},"0027101C":{"vr":"SL","Value":[150]},"0027101D":{"vr":"SS","Value":[1]},"0027101E":{"vr":"SL","Value":[24]},"0027101F":{"vr":"SL","Value":[129]},"00271020":{"vr":"SS","Value":[1]},"00271030":{"vr":"SH"},"00271035":{"vr":"SS","Value":[2]},"00271040":{"vr":"SH","Value":["I"]},"00271041":{"vr":"FL","Value":[-77.20406341552734]},"00271042":{"vr":"FL","Value":[-11.199999809265137]},"00271043":{"vr":"FL","Value":[9.699999809265137]},"00271044":{"vr":"FL","Value":[-75.69999694824219]},"00271045":{"vr":"FL","Value":[0.0]},"00271046":{"vr":"FL","Value":[0.0]},"00271047":{"vr":"FL","Value":[-1.0]},"00271048":{"vr":"FL","Value":[-180.53579711914062]},"00271049":{"vr":"FL","Value":[179.03579711914062]},"0027104A":{"vr":"FL","Value":[-75.69999694824219]},"0027104B":{"vr":"FL","Value":[-180.53579711914062]},"0027104C":{"vr":"FL","Value":[-159.63580322265625]},"0027104D":{"vr":"FL","Value":[-75.69999694824219]},"00271050":{"vr":"FL","Value":[-63.19999694824219]},"00271051":{"vr":"FL","Value":[-116.20304870605469]},"00271052":{"vr":"SH","Value":["L"]},"00271053":{"vr":"SH","Value":["A"]},"00271054":{"vr":"SH","Value":["I"]},"00271055":{"vr":"SH","Value":["I"]},"00280002":{"vr":"US","Value":[1]},"00280004":{"vr":"CS","Value":["MONOCHROME2"]},"00280010":{"vr":"US","Value":[128]},"00280011":{"vr":"US","Value":[128]},"00280030":{"vr":"DS","Value":[0.661468,0.661468]},"00280100":{"vr":"US","Value":[16]},"00280101":{"vr":"US","Value":[16]},"00280102":{"vr":"US","Value":[15]},"00280103":{"vr":"US","Value":[1]},"00280120":{"vr":"SS","Value":[-2000]},"00281052":{"vr":"DS","Value":[-1024.0]},"00281053":{"vr":"DS","Value":[1.0]},"00290010":{"vr":"LO","Value":["GEMS_IMPS_01"]},"00291004":{"vr":"SL","Value":[0]},"00291005":{"vr":"DS","Value":[0.0]},"00291006":{"vr":"DS","Value":[0.0]},"00291007":{"vr":"SL","Value":[87]},"00291008":{"vr":"SH"},"00291009":{"vr":"SH"},"0029100A":{"vr":"SS","Value":[764]},"00291026":{"vr":"SS","Value":[2]},"00291034":{"vr":"SL","Value":[0]},"00291035":{"vr":"SL","Value":[0]},"00430010":{"vr":"LO","Value":["GEMS_PARM_01"]},"00431010":{"vr":"US","Value":[400]},"00431011":{"vr":"US","Value":[10431]},"00431012":{"vr":"SS","Value":[14,2,3]},"00431013":{"vr":"SS","Value":[107,21,4,2,20]},"00431014":{"vr":"SS","Value":[4,4,5]},"00431015":{"vr":"SS","Value":[10431]},"00431016":{"vr":"SS","Value":[0]},"00431017":{"vr":"DS","Value":[0.095]},"00431018":{"vr":"DS","Value":[0.085,1.102,0.095]},"00431019":{"vr":"SS","Value":[350]},"0043101A":{"vr":"SL","Value":[7]},"0043101B":{"vr":"SS","Value":[0,0,0,0,0]},"0043101C":{"vr":"SS","Value":[0]},"0043101D":{"vr":"SS","Value":[40]},"0043101E":{"vr":"DS","Value":[2.0]},"0043101F":{"vr":"SL","Value":[0]},"00431020":{"vr":"DS","Value":[0.0]},"00431021":{"vr":"SS","Value":[0]},"00431025":{"vr":"SS","Value":[1,2,3,748,749,750]},"00431026":{"vr":"US","Value":[0,1,1,0,0,0]},"00431027":{"vr":"SH","Value":["/1.0:1"]},"00431028":{"vr":"OB","InlineBinary":"Q1QwMQAAAEhpU3BlZWQgQ1QvaQAwNTA1ejo9fAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},"00431029":{"vr":"OB","BulkDataURI":"00431029"},"0043102A":{"vr":"OB","InlineBinary":"Q1QwMQAAAEhpU3BlZWQgQ1QvaQAwNTA1ejo9fAAAAAAAAAAAAAAAAA=="},"0043102B":{"vr":"SS","Value":[4,4,0,0]},"00431031":{"vr":"DS","Value":[-11.2,9.7]},"00431040":{"vr":"FL","Value":[178.07992553710938]},"00431041":{"vr":"FL","Value":[3816.219482421875]},"00431042":{"vr":"SL","Value":[0]},"00431043":{"vr":"SL","Value":[0]},"00431044":{"vr":"SL","Value":[1]},"00431045":{"vr":"SL","Value":[1]},"00431046":{"vr":"SL","Value":[3]},"00431047":{"vr":"SL","Value":[-1]},"00431048":{"vr":"SL","Value":[1]},"00431049":{"vr":"SL","Value":[0]},"0043104A":{"vr":"SS","Value":[1]},"0043104B":{"vr":"SL","Value":[0]},"0043104C":{"vr":"SS","Value":[0]},"0043104D":{"vr":"FL","Value":[0.0]},"0043104E":{"vr":"FL","Value":[10.60060977935791]},"7FE00010":{"vr":"OW","BulkDataURI":"7FE00010"}}', 0);
INSERT INTO public.instance VALUES (2, '1.3.6.1.4.1.5962.1.1.8.1.3.20040826185059.5457', 2, '1.2.840.10008.5.1.4.1.1.7', 3, '1.2.840.10008.1.2.4.91', '1.3.6.1.4.1.5962.1.2.8.20040826185059.5457/1.3.6.1.4.1.5962.1.3.8.1.20040826185059.5457/1.3.6.1.4.1.5962.1.1.8.1.3.20040826185059.5457.dcm', 3308, '5be539024e6803029a7b73c0f8e72e88d032e3a0bc05922c0c047344780aa8e1', '2026-11-26 00:52:14.906723', '', '{"00080008":{"vr":"CS","Value":["DERIVED","PRIMARY","WHOLE BODY","EMISSION"]},"00080012":{"vr":"DA","Value":["19970911"]},"00080013":{"vr":"TM","Value":["125206"]},"00080014":{"vr":"UI","Value":["1.3.6.1.4.1.5962.3"]},"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.7"]},"00080018":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.1.8.1.3.20040826185059.5457"]},"00080020":{"vr":"DA","Value":["20040826"]},"00080021":{"vr":"DA","Value":["19970806"]},"00080022":{"vr":"DA","Value":["19970806"]},"00080023":{"vr":"DA","Value":["19970806"]},"00080030":{"vr":"TM","Value":["185059"]},"00080031":{"vr":"TM","Value":["122931"]},"00080032":{"vr":"TM","Value":["122931"]},"00080033":{"vr":"TM","Value":["122931"]},"00080050":{"vr":"SH"},"00080060":{"vr":"CS","Value":["NM"]},"00080064":{"vr":"CS","Value":["WSD"]},"00080070":{"vr":"LO","Value":["GE Medical Systems"]},"00080080":{"vr":"LO","Value":["Hospital Name 12345"]},"00080090":{"vr":"PN"},"00080201":{"vr":"SH","Value":["-0400"]},"00081010":{"vr":"SH","Value":["genieacq"]},"00081030":{"vr":"LO","Value":["Whole Body Bone"]},"00081060":{"vr":"PN"},"00081070":{"vr":"PN"},"00081090":{"vr":"LO","Value":["MILLENNIUM MG"]},"00082111":{"vr":"ST","Value":["JPEG 2000 irreversible (lossy) 2097:1"]},"00082112":{"vr":"SQ","Value":[{"00081150":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.7"]},"00081155":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.1.8.1.1.20040826185059.5457"]},"0040A170":{"vr":"SQ","Value":[{"00080100":{"vr":"SH","Value":["121320"]},"00080102":{"vr":"SH","Value":["DCM"]},"00080104":{"vr":"LO","Value":["Uncompressed predecessor"]}}]}}]},"00089215":{"vr":"SQ","Value":[{"00080100":{"vr":"SH","Value":["113040"]},"00080102":{"vr":"SH","Value":["DCM"]},"00080104":{"vr":"LO","Value":["Lossy Compression"]}}]},"00090010":{"vr":"LO","Value":["GEMS_GENIE_1"]},"00091010":{"vr":"LO","Value":["WB BONE"]},"00091011":{"vr":"SL","Value":[1]},"00091012":{"vr":"SL","Value":[1]},"0009101E":{"vr":"UI","Value":["1.2.840.113619.2.43.16112.2141964.41.61.870888524.19"]},"00091020":{"vr":"LO","Value":["WHOLE BODY"]},"00091021":{"vr":"SL","Value":[1]},"00091022":{"vr":"SH"},"00091023":{"vr":"SL","Value":[2]},"00091024":{"vr":"SL","Value":[60000]},"00091025":{"vr":"SL","Value":[20000]},"00091026":{"vr":"SL","Value":[1]},"00091027":{"vr":"SL","Value":[2]},"0009102A":{"vr":"SL","Value":[0]},"0009102C":{"vr":"LO"},"0009102E":{"vr":"FD","Value":[1.899999976158142]},"00091030":{"vr":"LO","Value":["WHOLE BODY"]},"00091040":{"vr":"LO","Value":["Patient,The"]},"00091041":{"vr":"SL","Value":[1]},"00091042":{"vr":"DA","Value":["19970806"]},"00091043":{"vr":"TM","Value":["122538"]},"00100010":{"vr":"PN","Value":[{"Alphabetic":"CompressedSamples^NM1"}]},"00100020":{"vr":"LO","Value":["8NM1"]},"00100030":{"vr":"DA"},"00100040":{"vr":"CS","Value":["M"]},"00101000":{"vr":"LO"},"00101001":{"vr":"PN"},"00101010":{"vr":"AS"},"00101020":{"vr":"DS","Value":[0.0]},"00101030":{"vr":"DS","Value":[0.0]},"00102160":{"vr":"SH"},"001021B0":{"vr":"LT"},"00104000":{"vr":"LT"},"00110010":{"vr":"LO","Value":["GEMS_GENIE_1"]},"0011100A":{"vr":"SL","Value":[1]},"0011100B":{"vr":"SL","Value":[1210632]},"0011100D":{"vr":"LO","Value":["Tc99m"]},"00111010":{"vr":"LO","Value":["WHOLE BODY_E"]},"00111012":{"vr":"LO","Value":["WHOLE BODY_E"]},"00111013":{"vr":"SL","Value":[2]},"00111015":{"vr":"SL","Value":[1]},"00111016":{"vr":"SL","Value":[1]},"00111019":{"vr":"FD","Value":[221.36400640010834]},"0011101A":{"vr":"SL","Value":[1]},"0011101B":{"vr":"SL","Value":[1]},"0011101C":{"vr":"SL","Value":[0,0,0,0]},"0011101F":{"vr":"SL","Value":[4]},"00111023":{"vr":"SL","Value":[1]},"00111027":{"vr":"SL","Value":[0,0]},"00111028":{"vr":"SL","Value":[0,0]},"00111030":{"vr":"LO","Value":["WHOLE BODY_E"]},"00111033":{"vr":"LO","Value":["ECOR"]},"00111034":{"vr":"LO","Value":["Tc99m"]},"00111035":{"vr":"LO","Value":["PMT"]},"00111038":{"vr":"SL","Value":[66]},"0011103A":{"vr":"SL","Value":[5]},"0011103B":{"vr":"FD","Value":[1.0]},"0011103C":{"vr":"FD","Value":[0.0]},"0011103E":{"vr":"SL","Value":[10]},"0011103F":{"vr":"SL","Value":[1]},"00111044":{"vr":"FD","Value":[2048.0]},"00111045":{"vr":"FD","Value":[4096.0]},"00111046":{"vr":"SL","Value":[2]},"00111055":{"vr":"FD","Value":[1.0]},"00111056":{"vr":"FD","Value":[1.0]},"00130010":{"vr":"LO","Value":["GEMS_GENIE_1"]},"00131010":{"vr":"FD","Value":[578.5599975585938,2314.239990234375]},"00131011":{"vr":"SL","Value":[5]},"00131012":{"vr":"SL","Value":[0]},"00131016":{"vr":"SL","Value":[140]},"00131017":{"vr":"SL","Value":[5]},"00131018":{"vr":"FD","Value":[0.0]},"00131019":{"vr":"FD","Value":[70.0]},"0013101A":{"vr":"FD","Value":[0.0]},"0013101C":{"vr":"FD","Value":[0.0]},"0013101D":{"vr":"FD","Value":[0.0]},"00131026":{"vr":"LT"},"00180015":{"vr":"CS","Value":["WHOLE BODY"]},"00180070":{"vr":"IS","Value":[3596452]},"00180071":{"vr":"CS","Value":["MANU"]},"00181000":{"vr":"LO","Value":["172.16.193.2"]},"00181020":{"vr":"LO","Value":["2.0"]},"00181030":{"vr":"LO","Value":["Whole Body Bone"]},"00181130":{"vr":"DS","Value":[654.820025]},"00181131":{"vr":"DS","Value":[1572.260022]},"00181242":{"vr":"IS","Value":[1210434]},"00181243":{"vr":"IS","Value":[950]},"00181300":{"vr":"DS","Value":[1.671598]},"00181301":{"vr":"CS","Value":["1PS"]},"00181302":{"vr":"IS","Value":[1899]},"00185100":{"vr":"CS","Value":["HFS"]},"0020000D":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.2.8.20040826185059.5457"]},"0020000E":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.3.8.1.20040826185059.5457"]},"00200010":{"vr":"SH","Value":["8NM1"]},"00200011":{"vr":"IS","Value":[1]},"00200013":{"vr":"IS","Value":[3]},"00200020":{"vr":"CS"},"00200052":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.4.8.1.20040826185059.5457"]},"00201040":{"vr":"LO"},"00204000":{"vr":"LT","Value":["JPEG 2000 irreversible (lossy)"]},"00280002":{"vr":"US","Value":[1]},"00280004":{"vr":"CS","Value":["MONOCHROME2"]},"00280008":{"vr":"IS","Value":[1]},"00280009":{"vr":"AT","Value":["00540010","00540020"]},"00280010":{"vr":"US","Value":[1024]},"00280011":{"vr":"US","Value":[256]},"00280030":{"vr":"DS","Value":[2.26,2.26]},"00280051":{"vr":"CS","Value":["NRGY","LIN"]},"00280100":{"vr":"US","Value":[16]},"00280101":{"vr":"US","Value":[16]},"00280102":{"vr":"US","Value":[15]},"00280103":{"vr":"US","Value":[1]},"00280106":{"vr":"SS","Value":[0]},"00280107":{"vr":"SS","Value":[278]},"00282110":{"vr":"CS","Value":["01"]},"00282112":{"vr":"DS","Value":[2097.0]},"00540010":{"vr":"US","Value":[1]},"00540011":{"vr":"US","Value":[1]},"00540020":{"vr":"US","Value":[1]},"00540021":{"vr":"US","Value":[1]},"00540400":{"vr":"SH","Value":["WHOLE BODY_E"]},"7FE00010":{"vr":"OB","BulkDataURI":"7FE00010"}}', 0);
INSERT INTO public.instance VALUES (3, '1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457', 3, '1.2.840.10008.5.1.4.1.1.4', 1, '1.2.840.10008.1.2.1', '1.3.6.1.4.1.5962.1.2.4.20040826185059.5457/1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457/1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457.dcm', 9830, '3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb', '2026-11-26 00:52:14.910424', '', '{"00080008":{"vr":"CS","Value":["DERIVED","SECONDARY","OTHER"]},"00080012":{"vr":"DA","Value":["20040826"]},"00080013":{"vr":"TM","Value":["185434"]},"00080014":{"vr":"UI","Value":["1.3.6.1.4.1.5962.3"]},"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.4"]},"00080018":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"]},"00080020":{"vr":"DA","Value":["20040826"]},"00080021":{"vr":"DA"},"00080022":{"vr":"DA"},"00080030":{"vr":"TM","Value":["185059"]},"00080031":{"vr":"TM"},"00080032":{"vr":"TM"},"00080050":{"vr":"SH"},"00080060":{"vr":"CS","Value":["MR"]},"00080070":{"vr":"LO","Value":["TOSHIBA_MEC"]},"00080080":{"vr":"LO","Value":["TOSHIBA"]},"00080090":{"vr":"PN"},"00080201":{"vr":"SH","Value":["-0400"]},"00081010":{"vr":"SH","Value":["000000000"]},"00081060":{"vr":"PN","Value":[{"Alphabetic":"----"}]},"00081070":{"vr":"PN","Value":[{"Alphabetic":"----"}]},"00081090":{"vr":"LO","Value":["MRT50H1"]},"00100010":{"vr":"PN","Value":[{"Alphabetic":"CompressedSamples^MR1"}]},"00100020":{"vr":"LO","Value":["4MR1"]},"00100030":{"vr":"DA"},"00100040":{"vr":"CS","Value":["F"]},"00101020":{"vr":"DS"},"00101030":{"vr":"DS","Value":[80.0]},"00180010":{"vr":"LO"},"00180020":{"vr":"CS","Value":["SE"]},"00180021":{"vr":"CS","Value":["NONE"]},"00180022":{"vr":"CS"},"00180023":{"vr":"CS","Value":["3D"]},"00180050":{"vr":"DS","Value":[0.8]},"00180080":{"vr":"DS","Value":[4000.0]},"00180081":{"vr":"DS","Value":[240.0]},"00180083":{"vr":"DS","Value":[1.0]},"00180084":{"vr":"DS","Value":[63.924339]},"00180085":{"vr":"SH","Value":["H"]},"00180086":{"vr":"IS","Value":[1]},"00180091":{"vr":"IS"},"00181000":{"vr":"LO","Value":["-0000200"]},"00181020":{"vr":"LO","Value":["V3.51*P25"]},"00181314":{"vr":"DS","Value":[90.0]},"00185100":{"vr":"CS","Value":["HFS"]},"0020000D":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"]},"0020000E":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457"]},"00200010":{"vr":"SH","Value":["4MR1"]},"00200011":{"vr":"IS","Value":[1]},"00200012":{"vr":"IS","Value":[0]},"00200013":{"vr":"IS","Value":[1]},"00200032":{"vr":"DS","Value":[-83.9063,-91.2,6.6406]},"00200037":{"vr":"DS","Value":[1.0,0.0,0.0,0.0,1.0,0.0]},"00200052":{"vr":"UI","Value":["1.3.6.1.4.1.5962.1.4.4.1.20040826185059.5457"]},"00200060":{"vr":"CS"},"00201040":{"vr":"LO"},"00201041":{"vr":"DS","Value":[0.0]},"00204000":{"vr":"LT","Value":["Uncompressed"]},"00280002":{"vr":"US","Value":[1]},"00280004":{"vr":"CS","Value":["MONOCHROME2"]},"00280010":{"vr":"US","Value":[64]},"00280011":{"vr":"US","Value":[64]},"00280030":{"vr":"DS","Value":[0.3125,0.3125]},"00280100":{"vr":"US","Value":[16]},"00280101":{"vr":"US","Value":[16]},"00280102":{"vr":"US","Value":[15]},"00280103":{"vr":"US","Value":[1]},"00280106":{"vr":"SS","Value":[0]},"00280107":{"vr":"SS","Value":[4000]},"00281050":{"vr":"DS","Value":[600.0]},"00281051":{"vr":"DS","Value":[1600.0]},"7FE00010":{"vr":"OW","BulkDataURI":"7FE00010"}}', 0);

INSERT INTO public.patient VALUES (1, '1CT1', '', 'CompressedSamples^CT1', 'COMPRESSEDSAMPLES^CT1', '', 'O', 1, 1, 1);
INSERT INTO public.patient VALUES (2, '8NM1', '', 'CompressedSamples^NM1', 'COMPRESSEDSAMPLES^NM1', '', 'M', 1, 1, 1);
INSERT INTO public.patient VALUES (3, '4MR1', '', 'CompressedSamples^MR1', 'COMPRESSEDSAMPLES^MR1', '', 'F', 1, 1, 1);

INSERT INTO public.series VALUES (1, '1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322', 1, 'CT', 1, '', 1);
INSERT INTO public.series VALUES (2, '1.3.6.1.4.1.5962.1.3.8.1.20040826185059.5457', 2, 'NM', 1, '', 1);
INSERT INTO public.series VALUES (3, '1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457', 3, 'MR', 1, '', 1);

INSERT INTO public.study VALUES (1, '1.3.6.1.4.1.5962.1.2.1.20040119072730.12322', 1, '20040119', '072730', '072730.000000', '', '1CT1', '', 'e+1', 'CT', '1.2.840.10008.5.1.4.1.1.2', 1, 1, '2026-11-26 00:52:14.902747');
INSERT INTO public.study VALUES (2, '1.3.6.1.4.1.5962.1.2.8.20040826185059.5457', 2, '20040826', '185059', '185059.000000', '', '8NM1', '', 'Whole Body Bone', 'NM', '1.2.840.10008.5.1.4.1.1.7', 1, 1, '2026-11-26 00:52:14.907705');
INSERT INTO public.study VALUES (3, '1.3.6.1.4.1.5962.1.2.4.20040826185059.5457', 3, '20040826', '185059', '185059.000000', '', '4MR1', '', '', 'MR', '1.2.840.10008.5.1.4.1.1.4', 1, 1, '2026-11-26 00:52:14.911321');

INSERT INTO public.studymodality VALUES (1, 1, 'CT');
INSERT INTO public.studymodality VALUES (2, 2, 'NM');
INSERT INTO public.studymodality VALUES (3, 3, 'MR');

SELECT pg_catalog.setval('public.instance_id_seq', 3, true);

SELECT pg_catalog.setval('public.patient_id_seq', 3, true);

SELECT pg_catalog.setval('public.series_id_seq', 3, true);

SELECT pg_catalog.setval('public.study_id_seq', 3, true);

SELECT pg_catalog.setval('public.studymodality_id_seq', 3, true);

ALTER TABLE ONLY public.instance
    ADD CONSTRAINT instance_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.patient
    ADD CONSTRAINT patient_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.series
    ADD CONSTRAINT series_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.study
    ADD CONSTRAINT study_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.studymodality
    ADD CONSTRAINT studymodality_pkey PRIMARY KEY (id);

CREATE INDEX instance_series_id ON public.instance USING btree (series_id);

CREATE INDEX instance_sop_class_uid ON public.instance USING btree (sop_class_uid);

CREATE UNIQUE INDEX instance_sop_uid ON public.instance USING btree (sop_uid);

CREATE INDEX patient_name_key ON public.patient USING btree (name_key);

CREATE UNIQUE INDEX patient_patient_id_issuer ON public.patient USING btree (patient_id, issuer);

CREATE INDEX series_modality ON public.series USING btree (modality);

CREATE UNIQUE INDEX series_series_uid ON public.series USING btree (series_uid);

CREATE INDEX series_study_id ON public.series USING btree (study_id);

CREATE INDEX study_accession_number ON public.study USING btree (accession_number);

CREATE INDEX study_patient_id ON public.study USING btree (patient_id);

CREATE INDEX study_study_date ON public.study USING btree (study_date);

CREATE UNIQUE INDEX study_study_uid ON public.study USING btree (study_uid);

CREATE UNIQUE INDEX studymodality_modality_study_id ON public.studymodality USING btree (modality, study_id);

CREATE INDEX studymodality_study_id ON public.studymodality USING btree (study_id);

ALTER TABLE ONLY public.instance
    ADD CONSTRAINT instance_series_id_fkey FOREIGN KEY (series_id) REFERENCES public.series(id);

ALTER TABLE ONLY public.series
    ADD CONSTRAINT series_study_id_fkey FOREIGN KEY (study_id) REFERENCES public.study(id);

ALTER TABLE ONLY public.study
    ADD CONSTRAINT study_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES public.patient(id);

ALTER TABLE ONLY public.studymodality
    ADD CONSTRAINT studymodality_study_id_fkey FOREIGN KEY (study_id) REFERENCES public.study(id);

